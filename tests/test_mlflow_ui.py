"""What the MLflow UI itself shows for a pipeline run, checked in headless Chromium.

A real ``mlflow server`` (``mlflow/serve.sh``: SQLite store and proxied artifacts under tmp_path, a
free loopback port) tracks the tiny PTB pipeline run through the CLI; then Debian's ``chromium``,
driven by Selenium through Debian's ``chromedriver``, loads the pages a person would look at:

* the experiment's runs table: the pipeline run, its stage runs nested under it;
* the pipeline run's page: its child runs;
* the page of the stage run that logged the model: its parent, the logged model, the registered model;
* the experiment's Models tab and the runs table's Models column: the logged model;
* a plot: a PNG artifact in the artifact viewer and a metric chart.

The MLflow 3 UI is a single-page app that fills pages in asynchronously: every check waits for the
content explicitly. Pages open in the "Model training" workflow (``?workflowType=machine_learning``);
MLflow 3.x opens experiments in its GenAI workflow by default. Every page is kept as a screenshot
(and its text) under ``$RLM_TEST_ARTIFACTS/mlflow-ui/``, else ``<repo>/test-artifacts/mlflow-ui/``,
whether its checks pass or not.

Without chromium / chromedriver / selenium the tests skip; with ``RLM_REQUIRE_BROWSER`` set (CI:
``.ci/run`` installs them) they fail instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, REPO, pipeline_env, tiny_ptb_config
from mlflow_server import MlflowServer

PIPELINE_NAME = "demo"  # the config's name: the parent run's name
EXPERIMENT = "mlflow_ui"  # tracking.experiment: also the registered model's name
STAGES = ("prepare", "train", "evaluate")
CHART_METRIC = "valid/reported_bpc"
PLOT = "plots/learning_curves.png"
WAIT = 60  # seconds for the SPA to show what a page is expected to show
GRACE = 10  # seconds more once a page has settled on something else (an empty table), before failing
WORKFLOW = "workflowType=machine_learning"
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1600,1200",
)


def _browser_paths() -> tuple[str, str]:
    """chromium and chromedriver, or skip (fail with RLM_REQUIRE_BROWSER set) saying what is missing."""
    missing = []
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium:
        missing.append("chromium")
    if not chromedriver:
        missing.append("chromedriver (Debian's chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        reason = f"headless browser not available: no {', '.join(missing)}; bash .ci/run installs them"
        if os.environ.get("RLM_REQUIRE_BROWSER"):
            pytest.fail(reason + " (RLM_REQUIRE_BROWSER is set)")
        pytest.skip(reason)
    return chromium, chromedriver


def _screenshot_dir() -> Path:
    root = os.environ.get("RLM_TEST_ARTIFACTS")
    path = (Path(root) if root else REPO / "test-artifacts") / "mlflow-ui"
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("*.png"), *path.glob("*.txt")]:  # no stale pictures from an earlier run
        old.unlink()
    return path


@contextlib.contextmanager
def _mlflow_server(root: Path):
    """``mlflow/serve.sh`` on a free loopback port: SQLite store and proxied artifacts under ``root``."""
    server = MlflowServer(root, str(root / "artifacts"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


class Tracked:
    """What the pipeline run left on the server (ids read through the API; the UI is what is checked)."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None, f"the pipeline created no experiment {EXPERIMENT!r}"
        self.experiment_id = experiment.experiment_id
        runs = client.search_runs([self.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1, [r.info.run_name for r in runs]
        self.parent_id = parents[0].info.run_id
        self.stage_ids = {r.data.tags.get("pipeline.stage"): r.info.run_id for r in runs
                          if r.data.tags.get("mlflow.parentRunId") == self.parent_id}
        assert set(self.stage_ids) == set(STAGES), self.stage_ids
        # The registered version and the stage run that logged it (that run's page shows both). Checked
        # by the tests that need them, so that a missing model fails those and not every page's test.
        versions = client.search_model_versions(f"name='{EXPERIMENT}'")
        self.versions = [(v.version, v.run_id) for v in versions]
        by_id = {v: k for k, v in self.stage_ids.items()}
        self.version = versions[0].version if len(versions) == 1 else None
        self.model_stage = by_id.get(versions[0].run_id) if len(versions) == 1 else None
        history = client.get_metric_history(self.stage_ids["train"], CHART_METRIC)
        self.chart_last = max(history, key=lambda m: m.step) if history else None

    def model_run(self) -> tuple[str, str]:
        """(stage, run id) of the stage run that registered the one model version; fails if there is none."""
        assert self.version is not None, f"want one registered version of {EXPERIMENT!r}, the API has {self.versions}"
        assert self.model_stage is not None, f"version {self.version} was not registered from a stage run: {self.versions}"
        return self.model_stage, self.stage_ids[self.model_stage]


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    return _browser_paths()


@pytest.fixture(scope="module")
def tracked(browser_paths, tmp_path_factory, ptb_char_dir):
    """A server holding one tiny pipeline run (after the browser check: skip before paying for it)."""
    root = tmp_path_factory.mktemp("mlflow_ui")
    with _mlflow_server(root) as uri:
        config = tiny_ptb_config(root / "run", ptb_char_dir)
        config["name"] = PIPELINE_NAME
        config["tracking"] = {"uri": uri, "experiment": EXPERIMENT, "system_metrics": False, "flush_timeout": 120}
        config["train"].update(max_steps=20, eval_every=10, log_every=5, eval_tokens=2000)
        config["evaluate"]["max_tokens"] = 2000
        config_path = root / "demo.yaml"
        config_path.write_text(yaml.safe_dump(config))
        # One intra-op thread: this tiny model gains nothing from two, and two threads spin-wait badly
        # whenever the cores are busy (measured: 14 s with one, 80 s with two on a loaded 2-core box).
        env = {**pipeline_env(), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([PYTHON, "-m", "pipeline", "run", "--config", str(config_path)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-5000:]
        yield Tracked(uri)


@pytest.fixture(scope="module")
def shots() -> Path:
    return _screenshot_dir()


@pytest.fixture(scope="module")
def browser(browser_paths, tracked):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # The driver's path is given: Selenium Manager (which would download one) never runs.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        driver.set_page_load_timeout(WAIT)
        driver.get(f"{tracked.uri}/health")
        # The MLflow Assistant side panel opens itself on a first visit and covers a third of each screenshot.
        driver.execute_script(
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        )
        yield driver
    finally:
        driver.quit()


class Page:
    """One UI page: explicit waits on what it shows, failures that quote what it does show."""

    def __init__(self, driver, name: str) -> None:
        self.driver = driver
        self.name = name

    def text(self, element=None) -> str:
        from selenium.common.exceptions import WebDriverException

        try:
            return (element or self.driver.find_element("tag name", "body")).text
        except WebDriverException:  # re-rendered while read
            return ""

    def wait(self, condition, what, timeout: float = WAIT):
        """Wait until ``condition(driver)`` is truthy and return it; else fail saying ``what`` (a string, or
        a function that says it then) never showed."""
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.wait import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.25,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(condition)
        except TimeoutException:
            what = what() if callable(what) else what
            pytest.fail(f"{self.name}: {what} not shown after {timeout:g} s. The page shows:\n{self.text()[:4000]}")

    def wait_text(self, *texts: str, timeout: float = WAIT) -> str:
        self.wait(lambda d: all(t in self.text() for t in texts), f"text {list(texts)}", timeout)
        return self.text()

    def element(self, xpath: str, what: str, timeout: float = WAIT):
        return self.wait(lambda d: next(iter(d.find_elements("xpath", xpath)), None), what, timeout)

    def settled(self, expected, other, what):
        """Wait for ``expected(driver)``, but once the page shows ``other(driver)`` (a loaded page that
        lacks it: an empty table) give it only GRACE seconds more."""
        self.wait(lambda d: expected(d) or other(d), what)
        return self.wait(expected, what, GRACE)


@contextlib.contextmanager
def open_page(driver, base: str, route: str, shots: Path, name: str):
    """Load ``route`` of the SPA afresh (so no earlier page's content satisfies a wait) and keep a
    screenshot and the text of what it showed, pass or fail."""
    sep = "&" if "?" in route else "?"
    driver.get("about:blank")
    driver.get(f"{base}/#{route}{sep}{WORKFLOW}")
    page = Page(driver, name)
    try:
        yield page
    finally:
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(shots / f"{name}.png"))
            (shots / f"{name}.txt").write_text(f"{driver.current_url}\n\n{page.text()}\n")


def _row(run_id: str) -> str:
    """The runs table's rows of a run (ag-grid: one row element per pinned / scrolled column group)."""
    return f"//div[@role='row'][@row-id='{run_id}']"


def _cell(driver, run_id: str, column: str) -> str | None:
    cells = driver.find_elements("xpath", f"{_row(run_id)}//div[@role='gridcell'][@col-id=\"attributes.`{column}`\"]")
    return cells[0].get_attribute("textContent").strip() if cells else None


def _version_link(tracked) -> str:
    return f"//a[contains(@href, '/models/{EXPERIMENT}/versions/{tracked.version}')]"


def _text(driver, xpath: str) -> str:
    found = driver.find_elements("xpath", xpath)
    return found[0].text if found else ""


def test_runs_table_nests_the_stage_runs_under_the_pipeline_run(browser, tracked, shots):
    with open_page(browser, tracked.uri, f"/experiments/{tracked.experiment_id}/runs", shots,
                   "01-experiment-runs") as page:
        page.wait_text("4 matching runs")
        page.wait(lambda d: _cell(d, tracked.parent_id, "Run Name"), "the pipeline run's row")
        assert _cell(browser, tracked.parent_id, "Run Name").endswith(PIPELINE_NAME)
        # Nested: the stage runs are not rows of their own until their parent is expanded.
        assert not browser.find_elements("xpath", " | ".join(_row(i) for i in tracked.stage_ids.values()))
        expand = browser.find_element("xpath", f"{_row(tracked.parent_id)}//div[@col-id=\"attributes.`Run Name`\"]//button")
        expand.click()
        page.wait(lambda d: all(_cell(d, i, "Run Name") for i in tracked.stage_ids.values()), "the expanded stage runs")
        parent_index = int(browser.find_element("xpath", _row(tracked.parent_id)).get_attribute("row-index"))
        shown = {}
        for stage, run_id in tracked.stage_ids.items():
            assert _cell(browser, run_id, "Run Name").endswith(stage)
            shown[stage] = int(browser.find_element("xpath", _row(run_id)).get_attribute("row-index"))
        # Right under the pipeline run.
        assert sorted(shown.values()) == [parent_index + 1, parent_index + 2, parent_index + 3], shown


def test_pipeline_run_page_lists_its_stage_runs(browser, tracked, shots):
    route = f"/experiments/{tracked.experiment_id}/runs/{tracked.parent_id}"
    with open_page(browser, tracked.uri, route, shots, "02-pipeline-run") as page:
        page.wait_text(PIPELINE_NAME, "Child runs", "final/test_bpc")
        for stage, run_id in tracked.stage_ids.items():
            link = page.element(f"//a[contains(@href, '/runs/{run_id}')]", f"a link to the {stage} run")
            assert link.text.strip().rstrip(",") == stage


def test_stage_run_page_shows_the_logged_and_registered_model(browser, tracked, shots):
    stage, run_id = tracked.model_run()
    route = f"/experiments/{tracked.experiment_id}/runs/{run_id}"
    with open_page(browser, tracked.uri, route, shots, f"03-{stage}-run") as page:
        page.wait_text("Parent run", "Registered models")
        parent = page.element(f"//a[contains(@href, '/runs/{tracked.parent_id}')]", "a link to the parent run")
        assert parent.text.strip() == PIPELINE_NAME
        # "Registered models": <experiment name> v<version>, a link into the model registry.
        registered = page.element(_version_link(tracked), "a link to the registered model version")
        assert registered.text.split() == [EXPERIMENT, f"v{tracked.version}"]

        # "Logged models (1)": the run's logged model, a link to it in the run's experiment, Ready, registered.
        heading = "//h4[starts-with(normalize-space(.), 'Logged models')]"
        section = f"{heading}/../.."
        page.element(heading, "the Logged models section")
        browser.save_screenshot(str(shots / f"03-{stage}-run-top.png"))
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                               browser.find_element("xpath", heading))  # into the screenshot kept at the end
        model = f"{section}//a[contains(@href, '/experiments/{tracked.experiment_id}/models/m-')]"
        page.settled(
            lambda d: d.find_elements("xpath", model) and d.find_elements("xpath", f"{section}{_version_link(tracked)}"),
            lambda d: "No models found" in _text(d, section),
            lambda: f"the logged model (in experiment {tracked.experiment_id}, registered as {EXPERIMENT} "
                    f"v{tracked.version}) under Logged models (which shows {_text(browser, section)!r})",
        )
        text = _text(browser, section)
        assert text.startswith("Logged models (1)") and "\nReady\n" in text, text
        assert [a.text for a in browser.find_elements("xpath", model)] == ["model"]


def test_experiment_models_tab_lists_the_logged_model(browser, tracked, shots):
    stage, run_id = tracked.model_run()
    with open_page(browser, tracked.uri, f"/experiments/{tracked.experiment_id}/models", shots,
                   "04-experiment-models") as page:
        page.wait_text("Model name", "Source run")
        model = f"//a[contains(@href, '/experiments/{tracked.experiment_id}/models/m-')]"
        page.settled(
            lambda d: d.find_elements("xpath", model) and d.find_elements("xpath", _version_link(tracked)),
            lambda d: "Track and compare versions of your models" in page.text(),
            f"a row: model 'model', logged from the {stage} run, registered as {EXPERIMENT} v{tracked.version}",
        )
        assert [a.text for a in browser.find_elements("xpath", model)] == ["model"]
        assert "\nReady\n" in page.text()
        source = page.element(f"//a[contains(@href, '/runs/{run_id}')]", f"a link to the {stage} run")
        assert source.text.strip() == stage
        assert browser.find_element("xpath", _version_link(tracked)).text.split() == [EXPERIMENT, f"v{tracked.version}"]


def test_runs_table_models_column_shows_the_model(browser, tracked, shots):
    stage, stage_id = tracked.model_run()
    with open_page(browser, tracked.uri, f"/experiments/{tracked.experiment_id}/runs", shots,
                   "05-experiment-runs-models-column") as page:
        page.wait(lambda d: _cell(d, tracked.parent_id, "Run Name"), "the pipeline run's row")
        if not browser.find_elements("xpath", _row(stage_id)):  # collapsed (the expansion is remembered)
            browser.find_element(
                "xpath", f"{_row(tracked.parent_id)}//div[@col-id=\"attributes.`Run Name`\"]//button").click()
        page.wait(lambda d: _cell(d, stage_id, "Models") is not None, f"the {stage} run's Models cell")
        page.settled(
            lambda d: _cell(d, stage_id, "Models") == f"{EXPERIMENT} v{tracked.version}",
            lambda d: _cell(d, stage_id, "Models") == "-",
            lambda: f"{EXPERIMENT} v{tracked.version} in the {stage} run's Models column "
                    f"(it shows {_cell(browser, stage_id, 'Models')!r})",
        )


def test_plot_artifact_renders(browser, tracked, shots):
    route = f"/experiments/{tracked.experiment_id}/runs/{tracked.parent_id}/artifacts/{PLOT}"
    with open_page(browser, tracked.uri, route, shots, "06-plot-artifact") as page:
        page.wait_text("learning_curves.png", "averaging_lengths.png", "final_summary.png", "config.yaml")
        img = page.element(f"//img[@alt='{PLOT}']", f"the image of {PLOT}")
        width = page.wait(lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", img), f"{PLOT} decoded")
        assert width >= 300, width  # matplotlib's figure, not a broken-image icon


def test_metric_chart_shows_the_metric(browser, tracked, shots):
    train = tracked.stage_ids["train"]
    query = urllib.parse.urlencode({
        "runs": json.dumps([train]), "metric": json.dumps(CHART_METRIC),
        "experiments": json.dumps([tracked.experiment_id]), "plot_metric_keys": json.dumps([CHART_METRIC]),
        "x_axis": "step", "y_axis_scale": "linear", "show_point": "true",
    })
    with open_page(browser, tracked.uri, f"/metric?{query}", shots, "07-metric-chart") as page:
        last = tracked.chart_last
        assert last is not None, f"the API has no {CHART_METRIC} of the train run"
        # The chart's legend, and the summary table's latest value (JS and Python print floats alike).
        page.wait_text(f"train ({CHART_METRIC})", f"{last.value!r} (step={last.step})")
        page.wait(lambda d: any(p.get_attribute("d") for p in d.find_elements(
            "css selector", ".js-plotly-plot .scatterlayer .trace path.js-line")), "the plotted line")
