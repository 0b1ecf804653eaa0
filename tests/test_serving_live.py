"""`mtbert serve` over real HTTP: the page in a headless chromium, a schema-driven fuzz run
against the OpenAPI spec, and SIGTERM draining the requests in flight of the command."""

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

import mtbert
from mtbert.serving.settings import ServeSettings

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from mtbert.serving.app import create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"  # git-ignored
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def live(app):
    """`app` served by uvicorn on a free loopback port, in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def model(tiny_run):
    return mtbert.load(tiny_run)


@pytest.fixture(scope="module")
def url(model):
    with live(create_app(model, ServeSettings(max_wait_ms=2))) as base:
        yield base


# ---------------------------------------------------------------- the page in a browser

@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium") and not os.path.exists(CHROMIUM):
        message = (f"BROWSER TEST SKIPPED: no chromium at {CHROMIUM}; scripts/setup.sh installs "
                   "it with apt-get as root (apt-get install chromium)")
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_page_in_a_browser(browser, url, model):
    """Types into the page, submits, reads the answer; a classification task shows a bar per
    class, a pair regression task a score; screenshots under tests/artifacts/."""
    page = browser.new_page(viewport={"width": 900, "height": 760})
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(url + "/")
    page.wait_for_selector("#form:not([hidden])")
    assert page.locator("#task option").all_inner_texts() == [
        "sst (sentence, classification)", "quora (pair, classification)",
        "sts (pair, regression)"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    page.select_option("#task", "sst")
    assert page.locator("#text-b-row").is_hidden()
    page.fill("#text-a", "a great movie with a good story")
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])")
    expected = model.predict("sst", ["a great movie with a good story"])[0]
    assert page.inner_text("#answer") == f"Label: {expected.label}"
    rows = page.locator("#bars .bar")
    assert rows.count() == 5
    assert rows.locator(".name").all_inner_texts() == list(expected.probabilities)
    assert rows.locator(".value").all_inner_texts() == [
        f"{100 * p:.1f}%" for p in expected.probabilities.values()]
    assert page.locator("#bars .bar.top .name").inner_text() == expected.label
    page.screenshot(path=str(ARTIFACTS / "serve-page-sst.png"), full_page=True)

    page.select_option("#task", "sts")
    page.fill("#text-a", "the cat sleeps")
    page.fill("#text-b", "a small cat sleeps")
    page.click("#submit")
    score = model.predict("sts", [("the cat sleeps", "a small cat sleeps")])[0].label
    page.wait_for_function("document.querySelector('#answer').textContent.startsWith('Score')")
    assert page.inner_text("#answer") == f"Score: {score:.2f}"
    page.screenshot(path=str(ARTIFACTS / "serve-page-sts.png"), full_page=True)

    page.fill("#text-b", "   ")  # the server's 422 message is shown, not a result
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == "inputs.0: empty text"
    assert page.locator("#result").is_hidden()
    assert all(u.startswith(url) for u in requested), requested  # nothing but our server
    assert (ARTIFACTS / "serve-page-sst.png").stat().st_size > 10_000


def test_docs_render_offline(browser, url):
    page = browser.new_page()
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=20_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/v1/predict", "/v1/embed", "/v1/tasks", "/health", "/metrics"} <= {
        p.replace("\u200b", "") for p in paths}
    page.screenshot(path=str(ARTIFACTS / "serve-docs.png"))
    assert all(u.startswith(url) for u in requested), requested


# ---------------------------------------------------------------- fuzzing the OpenAPI spec

def fuzz_spec() -> dict:
    """The app's OpenAPI spec (it does not depend on the model, so an app without one gives
    it) with `task` narrowed to the tiny model's tasks, so that valid cases reach the model
    (negative cases still send other names)."""
    spec = create_app(None, ServeSettings()).openapi()
    task = spec["components"]["schemas"]["PredictRequest"]["properties"]["task"]
    task["enum"] = ["sst", "quora", "sts"]
    return spec


schema = schemathesis.openapi.from_dict(fuzz_spec())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
FUZZ_STATUSES = collections.Counter()


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_fuzz_no_server_errors(case, url):
    """Requests generated from the OpenAPI spec, valid and invalid: no 5xx, ever, and every
    response as the spec says (status, content type, body schema, invalid data rejected).
    Left out: that schema-valid data is accepted; which texts a task takes (single or pair)
    is the task's, not the schema's, so `{"task": "sst", "inputs": [["a", "b"]]}` is a 422."""
    response = case.call(base_url=url, timeout=30)
    FUZZ_STATUSES[case.operation.label, response.status_code] += 1
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


def test_fuzz_reached_the_model():
    """The fuzz run above got predictions and embeddings, not only rejections."""
    if not FUZZ_STATUSES:
        pytest.skip("the fuzz run did not run in this session")
    print(dict(FUZZ_STATUSES))
    assert FUZZ_STATUSES["POST /v1/predict", 200] >= 5
    assert FUZZ_STATUSES["POST /v1/embed", 200] >= 5
    assert FUZZ_STATUSES["POST /v1/predict", 422] >= 5
    assert not [key for key in FUZZ_STATUSES if key[1] >= 500]


# ---------------------------------------------------------------- the command, SIGTERM

class ServeProcess:
    """`mtbert serve RUN --port 0 ...` in a subprocess; its log lines collected."""

    def __init__(self, *args: str, env: dict | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mtbert", "serve", *args, "--port", "0"],
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout),
                                       daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the log:\n{''.join(self.lines)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture
def serve_process():
    started = []

    def start(*args, **kwargs) -> ServeProcess:
        started.append(ServeProcess(*args, **kwargs))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def test_sigterm_drains_the_requests_in_flight(tiny_run, serve_process):
    """Four requests wait in the queue (max-wait 3 s) when SIGTERM comes: each still gets its
    answer, then the process exits; a new connection is refused meanwhile."""
    server = serve_process(str(tiny_run), "--max-wait-ms", "3000", "--api-key-env", "KEY_VAR",
                           env={"KEY_VAR": "k"})
    base = server.wait_for(r"Uvicorn running on (http://127\.0\.0\.1:\d+)").group(1)
    server.wait_for(r"model loaded; ready \(tasks: sst, quora, sts\)")
    key = {"Authorization": "Bearer k"}
    assert httpx.get(base + "/health").json() == {"status": "ready"}
    texts = ["good movie", "awful plot", "fine film", "bad actor"]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, base + "/v1/predict", headers=key, timeout=30,
                               json={"task": "sst", "inputs": [text]}) for text in texts]
        deadline = time.monotonic() + 10
        while 'mtbert_queue_depth 4.0' not in httpx.get(base + "/metrics", headers=key).text:
            assert time.monotonic() < deadline, "the requests did not queue"
            time.sleep(0.05)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.wait_for("Shutting down", 10)
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health")
        responses = [future.result() for future in futures]
    assert [r.status_code for r in responses] == [200] * 4
    assert [len(r.json()["predictions"]) for r in responses] == [1] * 4
    assert server.process.wait(30) in (0, -signal.SIGTERM)
    assert time.monotonic() - sent < 20
    log = "".join(server.lines)
    assert "Traceback" not in log and "Application shutdown complete" in log


def test_serve_command_load_failure_is_one_line(tmp_path, serve_process):
    """A folder that holds no model: the server stops, the command says why in one line."""
    (tmp_path / "empty").mkdir()
    server = serve_process(str(tmp_path / "empty"))
    assert server.process.wait(60) == 2
    server.reader.join(5)
    errors = [line for line in server.lines if line.startswith("mtbert serve: error: ")]
    assert len(errors) == 1 and str(tmp_path / "empty") in errors[0], "".join(server.lines)
