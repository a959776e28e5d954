"""pipelines/specs/: see pipelines/__init__.py."""
