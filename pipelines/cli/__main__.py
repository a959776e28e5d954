"""`python -m pipelines.cli`: the command line, run here (no kernel server)."""

from pipelines.cli import main

main()
