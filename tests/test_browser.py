"""The MLflow UI on a real study, in a real browser: Debian's headless Chromium driven by Selenium.

Skips (with the reason) where Chromium or its driver is missing; `.ci/run` installs both and sets
LABBOOK_REQUIRE_BROWSER=1, so in CI a missing browser is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.specs.spec import PROJECT_ROOT
from tests.conftest import LABBOOK, labbook
from tests.test_ui import free_port

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if not missing:
        return
    reason = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
    if os.environ.get("LABBOOK_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",  # this machine has no outside network
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition, message=f"waiting for {what}")


def text_on_page(needle: str):
    from selenium.webdriver.common.by import By

    return lambda d: needle in d.find_element(By.TAG_NAME, "body").text


def test_the_mlflow_ui_shows_a_study_its_trials_their_params_metrics_and_notebook(
    store: str, tmp_path: Path, browser
) -> None:
    from selenium.webdriver.common.by import By

    spec = str(PROJECT_ROOT / "pipelines" / "regression_tune.yaml")
    done = labbook(
        "tune", spec, "--n-trials", "2", "--set", "max_epochs=2", "--study-name", "ui-study", "--no-report",
        "--no-register",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("regression-tune")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "study:ui-study"]
    trials = sorted((r for r in runs if r.info.run_id != parent.info.run_id), key=lambda r: r.info.run_name)
    assert len(trials) == 2

    port = free_port()
    ui = subprocess.Popen([str(LABBOOK), "ui", "--port", str(port)], stdout=subprocess.DEVNULL, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and ui.poll() is None, "the MLflow UI did not start"
                time.sleep(0.5)

        # The experiment page lists the study's parent run; expanded, its trials nested under it.
        browser.get(f"{base}/#/experiments/{experiment.experiment_id}/runs")
        wait_for(browser, text_on_page("study:ui-study"), "the study's parent run")
        name = browser.find_element(By.XPATH, "//*[text()='study:ui-study']")
        row = name.find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
        row.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()
        for trial in trials:
            wait_for(browser, text_on_page(trial.info.run_name), f"trial run {trial.info.run_name}")
        browser.save_screenshot(str(tmp_path / "experiment.png"))

        # A trial's page shows its parameters and metrics, with the values MLflow recorded.
        trial = trials[0]
        browser.get(f"{base}/#/experiments/{experiment.experiment_id}/runs/{trial.info.run_id}")
        wait_for(browser, text_on_page("Parameters"), "the run page")
        wait_for(browser, text_on_page("val_r2"), "the metrics table")
        page = browser.find_element(By.TAG_NAME, "body").text
        assert "lr" in page.split() and trial.data.params["lr"] in page
        assert "max_epochs" in page and f"{trial.data.metrics['val_r2']}"[:6] in page
        browser.save_screenshot(str(tmp_path / "run.png"))

        # The executed notebook's HTML renders inside the artifact viewer.
        artifact = (
            f"{base}/#/experiments/{experiment.experiment_id}/runs/{trial.info.run_id}/artifacts/notebook/train.html"
        )
        browser.get(artifact)
        frame = wait_for(browser, lambda d: d.find_elements(By.TAG_NAME, "iframe"), "the HTML viewer")[0]
        browser.switch_to.frame(frame)
        wait_for(browser, text_on_page("Train one model"), "the notebook's title inside the viewer")
        assert "Learning curves" in browser.find_element(By.TAG_NAME, "body").text
        assert browser.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png']")  # plots, embedded
        browser.switch_to.default_content()
        browser.save_screenshot(str(tmp_path / "notebook.png"))
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    for shot in ("experiment.png", "run.png", "notebook.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot  # evidence, kept in the test's folder
    if os.environ.get("LABBOOK_SCREENSHOTS"):  # how the README's screenshot is refreshed
        shutil.copy(tmp_path / "experiment.png", os.environ["LABBOOK_SCREENSHOTS"])
