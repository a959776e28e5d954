"""`labbook ui` serves the runs' own store, on 127.0.0.1 unless asked otherwise."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request

from mlflow import MlflowClient

from pipelines.tracking import tracking
from tests.conftest import LABBOOK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store_on_localhost(store: str) -> None:
    client = MlflowClient(store)
    run_id = tracking.start_run(client, "seen-in-ui", run_name="visible")
    port = free_port()
    ui = subprocess.Popen([str(LABBOOK), "ui", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert ui.stdout.readline().strip().endswith(f"at http://127.0.0.1:{port}  (Ctrl-C to stop)")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=seen-in-ui"
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    experiment = json.load(response)["experiment"]
                break
            except OSError:
                assert time.monotonic() < deadline, "the UI did not answer within 60 s"
                time.sleep(0.5)
        search = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(search, timeout=10) as response:
            assert [r["info"]["run_id"] for r in json.load(response)["runs"]] == [run_id]
        if shutil.which("ss"):
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
            assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    # Stopping labbook stops the server it started: nothing is left listening.
    time.sleep(1)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
