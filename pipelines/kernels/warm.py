"""What a warm kernel (and a fork server) imports and loads before any notebook runs.

Runs inside kernels and zygotes: it imports nothing of labbook's orchestration (the pool, the
fork server, papermill), so a zygote can import it and the kernel pool can name it in the code
it sends to a kernel. Split from `kernel_pool.py` in issue 24: the fork server imported the
pool for `warm_up`, and the pool imported the fork server.
"""

from __future__ import annotations

# What every training notebook imports first; imported in the warm kernel before it is handed out.
WARM_MODULES = (
    "torch",
    "lightning.pytorch",
    "mlflow",
    "optuna",
    "optuna_integration",
    "pandas",
    "matplotlib.pyplot",
    "sklearn.metrics",
    "lightning_modules.registry",  # the package itself imports its models lazily
    "pipelines.nb.in_notebook",
    "mlflow.pytorch",
)


def warm_up(tracking_uri: str | None = None, caches: bool = True) -> None:
    """Runs inside a pool kernel before it is handed out: everything a trial would pay for first.

    Only process-wide caches are filled (modules, the tracking store, fonts, MLflow's first
    model save); the kernel's user namespace stays empty for the notebook. A kernel forked from
    a zygote has the modules and caches already (`caches=False`): only its store is its own.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if caches:
            _fill_caches()
        if tracking_uri:
            # Opening the store (engine, schema check) costs 0.6-1.6 s; MLflow caches it per process.
            # Never in a zygote: its kernels would share one forked database connection.
            from pipelines.tracking import tracking

            store = tracking.client(tracking_uri)._tracking_client.store
            del store


def _fill_caches() -> None:
    """Import what every trial imports, and load what its first plot and first model save load."""
    import importlib
    import io
    import tempfile

    for name in WARM_MODULES:
        importlib.import_module(name)
    import mlflow.pytorch
    import torch
    from matplotlib.figure import Figure

    figure = Figure()
    figure.add_subplot().plot([0, 1], label="warm")
    figure.savefig(io.BytesIO(), format="png")  # the font cache and Agg, loaded once
    with tempfile.TemporaryDirectory() as folder:  # MLflow's first model save costs ~0.6 s
        mlflow.pytorch.save_model(
            torch.nn.Linear(2, 1), f"{folder}/model", input_example=torch.ones(1, 2).numpy(), pip_requirements=[]
        )


def warm_code(tracking_uri: str | None, caches: bool) -> str:
    """The code a pool runs in a kernel it started, before handing it out."""
    return f"__import__('importlib').import_module({__name__!r}).warm_up({tracking_uri!r}, {caches!r})"
