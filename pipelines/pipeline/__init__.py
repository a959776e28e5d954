"""pipelines/pipeline/: see pipelines/__init__.py."""
