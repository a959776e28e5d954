"""pipelines/kernels/: see pipelines/__init__.py."""
