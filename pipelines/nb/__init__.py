"""pipelines/nb/: see pipelines/__init__.py."""
