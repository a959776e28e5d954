"""pipelines/execution/: see pipelines/__init__.py."""
