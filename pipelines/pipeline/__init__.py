"""pipelines/pipeline/: pipelines of steps (train, tune, evaluate, register, ...) as one parent run.

Owns: running a pipeline spec's steps in order, passing outputs between them, continuing from
a step (pipeline.py). May import: `pipelines/specs/`, `pipelines/tracking/`,
`pipelines/execution/`, `pipelines/kernels/`, `pipelines/study/`, `pipelines/launchers/` (a train or
tune step with a SLURM `launcher:`; layer 8 of `pipelines/__init__.py`, above the launchers).
"""
