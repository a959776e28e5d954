"""Launchers: where a study's workers and a training's processes run, other than this machine.

`slurm` hands them to a SLURM cluster: a study's workers as one job array (submitit), a
training as one `sbatch` job whose `srun` tasks are Lightning's DDP ranks, and `labbook jobs`
(which runs and trials are on which job). It owns every call to `sbatch`, `squeue`, `sinfo`,
`scontrol` and `scancel`, and checks the user's SLURM settings before anything is created.

Imports: the standard library, submitit, and `pipelines` orchestration (tune, run, script,
tracking, study, spec); nothing in `pipelines` imports this package except the CLI and the
pipeline runner, and only inside the functions that launch.
"""
