"""pipelines/execution/: a notebook executed by papermill into one MLflow run, and the verbs on one run.

Owns: executing and attaching a notebook (notebook.py), closing a run after it (closing.py: HTML,
staged uploads, status; a study's background closer), `labbook run` (run.py), resumable
checkpoints (resume.py), `labbook rerun` (rerun.py), notebook -> script for torchrun
(script.py), `labbook reap`: runs whose driver died closed with their partial notebook
(reap.py). May import: `pipelines/specs/`, `pipelines/tracking/`, `pipelines/kernels/`,
papermill, nbconvert; `pipelines/nb/logged_model.py` (lazily: a study's model logged from its
checkpoint). Never imported by a notebook kernel (`pipelines/nb/` is what they use).
"""
