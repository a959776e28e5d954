"""pipelines/kernels/: Jupyter kernels started ahead of the notebooks that need them.

Owns: the environment every labbook process reads about kernels and forked commands (env.py,
standard library only: the entry point imports it), what a warm kernel loads (warm.py), the warm
pool (kernel_pool.py) and the fork server (kernel_fork.py). May import: `pipelines/tracking/`
(warm.py opens the store), jupyter_client, ipykernel. The fork server runs `labbook` commands by
name (`--commands`), never by importing the CLI.
"""
