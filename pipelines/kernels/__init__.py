"""pipelines/kernels/: Jupyter kernels started ahead of the notebooks that need them.

Owns: the environment every labbook process reads about kernels and forked commands (env.py,
standard library only: the entry point imports it), what a warm kernel loads (warm.py), the warm
pool (kernel_pool.py), the fork server (kernel_fork.py) and its socket path, claimed under a
lock (socket_claim.py). May import: `pipelines/specs/environment.py` (env.py takes its readers
from there), `pipelines/tracking/` (warm.py opens the store), jupyter_client, ipykernel. The
fork server runs `labbook` commands by name (`--commands`), never by importing the CLI.
"""
