"""pipelines/schedule/: see pipelines/__init__.py."""
