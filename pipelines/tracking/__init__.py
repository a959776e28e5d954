"""pipelines/tracking/: MLflow glue, and the names of what a run records.

Owns: where runs go and how they are created and closed (tracking.py), every tag and Optuna
user-attribute name (tags.py), a run's record read back (records.py: executed notebook, injected
parameters, provenance), the Model Registry step (champion.py), the MLflow server command
(server.py), who drives a run and whether it still lives (driver.py), the files a kernel stages
for its driver to upload (staged.py). May import:
`pipelines/specs/`, `pipelines/errors.py`, MLflow, nbformat. No papermill, no torch: notebook
kernels import it.
"""
