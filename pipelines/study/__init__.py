"""pipelines/study/: see pipelines/__init__.py."""
