"""pipelines/study/: Optuna studies whose trials are executed notebooks.

Owns: the Optuna glue (study.py: storage, sampler, pruner, what counts against the budget), the
driver and its workers (tune.py), seed-robust selection of the best trial (confirm.py).
guarded_sampler.py (a sampler's error fails its trial, not the study) is study.py's. study.py is
a lower layer than the rest: notebook kernels import it (the pruning callback rebuilds the
trial), so it imports only `pipelines/specs/`, `pipelines/tracking/` and Optuna. tune.py and
confirm.py may import `pipelines/execution/` and `pipelines/kernels/` too.
"""
