"""Errors the command line words for users, importable without MLflow or torch (for a fast CLI)."""


class TrackingUnavailable(RuntimeError):
    """The MLflow server refused or could not be reached: nothing was started."""
