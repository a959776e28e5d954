"""Nothing leaves the machine unasked: MLflow's usage telemetry is off in every labbook process.

MLflow >= 3.2 sends usage records to its own endpoint unless told not to, and turns itself off
only under CI or pytest, so a user's laptop would send them while every test passes. These run
a fresh interpreter with the CI and pytest markers removed from its environment, as a user's is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
# The variables mlflow.telemetry.utils._is_ci_env_or_testing reads: a user's shell has none of them.
CI_MARKERS = ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS")
CHECK = (
    "import {module}; from mlflow.telemetry.utils import is_telemetry_disabled; "
    "import os; print(is_telemetry_disabled(), os.environ.get('MLFLOW_DISABLE_TELEMETRY'))"
)


def _user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CI_MARKERS and k != "MLFLOW_DISABLE_TELEMETRY"}
    return {**env, **extra}


def _telemetry(module: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHECK.format(module=module)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_mlflow_alone_would_send_telemetry_from_a_users_shell() -> None:
    # The premise: without labbook, MLflow's telemetry is on in this environment (else the next test proves nothing).
    assert _telemetry("mlflow", _user_env()) == "False None"


@pytest.mark.parametrize("module", ["pipelines.tracking.tracking", "pipelines.nb.in_notebook", "pipelines.cli"])
def test_every_labbook_process_that_talks_to_mlflow_turns_it_off(module: str) -> None:
    # The CLI, a notebook's kernel (plain papermill too) and what they start (kernels, `mlflow server`) inherit it.
    assert _telemetry(module, _user_env()) == "True true"


def test_a_users_own_choice_wins() -> None:
    assert _telemetry("pipelines.tracking.tracking", _user_env(MLFLOW_DISABLE_TELEMETRY="false")) == "False false"
