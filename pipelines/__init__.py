"""labbook's orchestration: specs in, executed notebooks tracked in MLflow out.

Packages by concern, in layers: a module imports only from lower layers (or its own package),
never from a higher one, and `tests/test_import_graph.py` holds the code to that, counting imports
inside functions. `lightning_modules/` sits below all of it and imports nothing from here.

    layer  package                      owns
    0      errors.py                    errors the CLI words for users (no MLflow, no torch)
    1      specs/                       YAML -> validated spec objects (pydantic); every LABBOOK_* variable
    2      tracking/                    MLflow glue, tag names (tags.py), records, registry, server, run drivers
    3      study/study.py               Optuna glue: storage, sampler, pruner, budget (and guarded_sampler.py)
    4      nb/                          what notebook kernels import; no papermill, no orchestration
    4      kernels/                     warm kernel pool, fork server, its socket, their environment (env.py)
    5      execution/                   a notebook executed into a run (papermill); run, rerun, script, reap
    5      reports/                     recorded runs read back: compare, diff
    6      study/                       the study driver (tune.py) and seed-robust selection
    7      launchers/                   studies and trainings run elsewhere: SLURM (sbatch, job arrays, srun)
    8      pipeline/                    pipelines of steps (a train or tune step may run on a launcher)
    8      schedule/                    the scheduler, cron expressions, crontab/systemd export
    9      cli/                         the `labbook` command; nothing imports it back
    10     launch.py                    the console entry point (forks commands via a kernel server)

Write a package as a path (`pipelines/tracking/`) in prose: `tools/restructure.py`, which made
this layout, rewrites the old dotted module names wherever it finds them.
"""
