"""pipelines/nb/: what notebook kernels import. No orchestration: no papermill, no kernels, no drivers.

Owns: the helper a notebook calls for its MLflow logger, callbacks, figures, tables and model
(in_notebook.py) and a trained run reopened for compress/explain (trained.py). May import:
`pipelines/specs/`, `pipelines/tracking/`, `pipelines/study/study.py` (the pruning callback),
`lightning_modules/`. The notebooks themselves keep to the same rule.
"""
