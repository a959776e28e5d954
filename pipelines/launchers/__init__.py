"""Launchers: where a study's workers and a training's processes run, other than this machine.

`slurm` hands them to a SLURM cluster: a study's workers as one job array (submitit), a
training as one `sbatch` job whose `srun` tasks are Lightning's DDP ranks, and `labbook jobs`
(which runs and trials are on which job). It owns every call to `sbatch`, `squeue`, `sinfo`,
`scontrol` and `scancel`, and checks the user's SLURM settings before anything is created.

Owns: launching labbook's work on a cluster (`slurm.py`: sbatch, job arrays, srun DDP ranks,
requeue) and reporting which runs ran on which job. May import: the standard library, submitit,
and the layers below (`pipelines/specs/`, `pipelines/tracking/`, `pipelines/study/`,
`pipelines/execution/`); imported only by `pipelines/pipeline/` (steps with a `launcher:`) and
`pipelines/cli/` (layer 7 of `pipelines/__init__.py`), and only inside the functions that launch.
"""
