"""pipelines/tracking/: see pipelines/__init__.py."""
