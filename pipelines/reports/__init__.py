"""pipelines/reports/: see pipelines/__init__.py."""
