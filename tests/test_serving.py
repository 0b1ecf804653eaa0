"""`mtbert serve`'s app through an ASGI client: every endpoint and every error path, the
cross-request batcher, and the command's argument errors."""

import asyncio
import json
import re
import threading
import time
from contextlib import asynccontextmanager

import numpy as np
import pytest

import mtbert
from mtbert.cli import main
from mtbert.config import ConfigError
from mtbert.serving.settings import ServeSettings

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from mtbert.serving.app import create_app  # noqa: E402
from mtbert.serving.batching import Batcher, QueueFull  # noqa: E402

pytestmark = pytest.mark.anyio
KEY = "s3cret-key"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def model(tiny_run):
    return mtbert.load(tiny_run)


@asynccontextmanager
async def served(model, **settings):
    """A client of a started app (lifespan entered, so its batcher runs)."""
    app = create_app(model, ServeSettings(**settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://mtbert") as client:
            client.app = app
            yield client


@pytest.fixture
async def client(model):
    async with served(model) as client:
        yield client


def metric(text: str, name: str) -> float:
    """The value of one sample line of Prometheus text (`name` with its labels)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def assert_error(response, status: int, error_type: str, field: str | None, pattern: str):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type
    assert body.get("field") == field
    assert re.search(pattern, body["error"]), body["error"]
    return body


# ---------------------------------------------------------------- the endpoints

async def test_predict_classification_equals_the_api(client, model):
    texts = ["good movie plot", "awful film", "the story is fine"]
    response = await client.post("/v1/predict", json={"task": "sst", "inputs": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["task"], body["kind"]) == ("sst", "classification")
    for served_one, expected in zip(body["predictions"], model.predict("sst", texts)):
        assert served_one["label"] == expected.label
        assert served_one["label_id"] == expected.label_id
        assert served_one["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
        assert "score" not in served_one


@pytest.mark.parametrize("task", ["quora", "sts"])
async def test_predict_pairs_equals_the_api(client, model, task):
    pairs = [["good movie", "good film"], ["cat runs", "dog sleeps big"]]
    response = await client.post("/v1/predict", json={"task": task, "inputs": pairs})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    for served_one, expected in zip(predictions, model.predict(task, pairs)):
        if task == "sts":
            assert served_one == {"score": pytest.approx(expected.label, abs=1e-5)}
        else:
            assert served_one["label"] == expected.label


async def test_predict_no_inputs(client):
    response = await client.post("/v1/predict", json={"task": "sts", "inputs": []})
    assert response.status_code == 200
    assert response.json()["predictions"] == []


@pytest.mark.parametrize("normalize", [True, False])
async def test_embed_equals_the_api(client, model, normalize):
    texts = ["good movie", "the cat sleeps"]
    response = await client.post("/v1/embed", json={"inputs": texts, "normalize": normalize})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = model.encode(texts, normalize=normalize)
    assert body["dimension"] == expected.shape[1] == 32
    np.testing.assert_allclose(body["embeddings"], expected, atol=1e-5)


async def test_embed_normalizes_by_default(client):
    response = await client.post("/v1/embed", json={"inputs": ["good movie"]})
    assert np.linalg.norm(response.json()["embeddings"][0]) == pytest.approx(1.0, abs=1e-5)


async def test_tasks(client):
    response = await client.get("/v1/tasks")
    assert response.status_code == 200
    body = response.json()
    assert body["embedding_task"] == "quora"
    assert body["tasks"] == [
        {"name": "sst", "kind": "classification", "pair": False, "label_range": None,
         "labels": ["very negative", "negative", "neutral", "positive", "very positive"]},
        {"name": "quora", "kind": "classification", "pair": True, "label_range": None,
         "labels": ["not duplicate", "duplicate"]},
        {"name": "sts", "kind": "regression", "pair": True, "labels": None,
         "label_range": [0.0, 5.0]}]


async def test_health_is_503_until_the_model_is_loaded(model):
    app = create_app(None, ServeSettings())
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://mtbert") as client:
        response = await client.get("/health")
        assert (response.status_code, response.json()) == (503, {"status": "loading"})
        for request in (client.get("/v1/tasks"),
                        client.post("/v1/predict", json={"task": "sst", "inputs": ["good"]}),
                        client.post("/v1/embed", json={"inputs": ["good"]})):
            response = await request
            assert_error(response, 503, "loading", None, "still loading")
            assert response.headers["retry-after"] == "1"
        app.state.service.start(model)
        response = await client.get("/health")
        assert (response.status_code, response.json()) == (200, {"status": "ready"})
        response = await client.post("/v1/predict", json={"task": "sst", "inputs": ["good"]})
        assert response.status_code == 200


async def test_metrics(client):
    await client.post("/v1/predict", json={"task": "sst", "inputs": ["good", "bad movie"]})
    await client.post("/v1/predict", json={"task": "nli", "inputs": ["good"]})
    await client.get("/nowhere")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, 'mtbert_requests_total{path="/v1/predict",status="200"}') == 1
    assert metric(text, 'mtbert_requests_total{path="/v1/predict",status="404"}') == 1
    assert metric(text, 'mtbert_requests_total{path="other",status="404"}') == 1
    assert metric(text, 'mtbert_request_duration_seconds_count{path="/v1/predict"}') == 2
    assert metric(text, 'mtbert_batch_size_count{task="sst"}') == 1
    assert metric(text, 'mtbert_batch_size_sum{task="sst"}') == 2
    assert metric(text, 'mtbert_batch_duration_seconds_count{task="sst"}') == 1
    assert metric(text, "mtbert_queue_depth") == 0


async def test_openapi_and_offline_docs(client):
    schema = (await client.get("/openapi.json")).json()
    assert {"/v1/predict", "/v1/embed", "/v1/tasks", "/health", "/metrics"} <= set(
        schema["paths"])
    assert "413" in schema["paths"]["/v1/predict"]["post"]["responses"]
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and all(a.startswith("/docs-assets/") for a in assets)  # no CDN
    for asset in assets:
        assert (await client.get(asset)).status_code == 200, asset


async def test_page_and_its_files(client):
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    files = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert sorted(files) == ["/static/app.js", "/static/style.css"]
    for path in files:
        assert (await client.get(path)).status_code == 200
    assert "http" not in (await client.get("/static/app.js")).text  # no remote resource


# ---------------------------------------------------------------- errors

async def test_unknown_task_is_404_listing_the_tasks(client):
    response = await client.post("/v1/predict", json={"task": "nli", "inputs": ["good"]})
    body = assert_error(response, 404, "not_found", "task",
                        r"^unknown task 'nli'; this model's tasks: sst, quora, sts$")
    assert body["tasks"] == ["sst", "quora", "sts"]


@pytest.mark.parametrize("task, value, pattern", [
    ("sst", ["good", "bad"], r"^inputs\.1: task 'sst' takes single texts, got list"),
    ("quora", "good movie", r"^inputs\.1: task 'quora' takes \(text, text\) pairs, got str"),
    ("sts", ["a", "b", "c"], r"^inputs\.1: task 'sts' takes \(text, text\) pairs, got list"),
    ("sts", ["good"], r"^inputs\.1: task 'sts' takes \(text, text\) pairs"),
    ("sst", "   ", r"^inputs\.1: empty text$"),
    ("sts", ["good", ""], r"^inputs\.1: empty text$"),
])
async def test_wrong_arity_and_empty_texts_are_422(client, task, value, pattern):
    first = "good" if task == "sst" else ["good", "bad"]
    response = await client.post("/v1/predict", json={"task": task, "inputs": [first, value]})
    assert_error(response, 422, "validation", "inputs.1", pattern)


async def test_lone_surrogate_is_422_not_500(client):
    body = '{"task": "sst", "inputs": ["good", "bad \\ud800 movie"]}'
    response = await client.post("/v1/predict", content=body,
                                 headers={"content-type": "application/json"})
    assert_error(response, 422, "validation", "inputs.1", "not valid Unicode at character 4")
    response = await client.post("/v1/embed", content='{"inputs": ["\\udfff"]}',
                                 headers={"content-type": "application/json"})
    assert_error(response, 422, "validation", "inputs.0", "not valid Unicode")


@pytest.mark.parametrize("body, field, pattern", [
    ('{"task": "sst", "inputs": ', "body", r"^body: JSON decode error"),
    ('{"inputs": ["good"]}', "task", r"^task: Field required"),
    ('{"task": "sst"}', "inputs", r"^inputs: Field required"),
    ('{"task": "sst", "inputs": "good"}', "inputs", r"^inputs: Input should be a valid list"),
    ('{"task": "sst", "inputs": [1]}', "inputs.0", r"^inputs\.0: Input should be a valid"),
    ('{"task": 3, "inputs": ["good"]}', "task", r"^task: Input should be a valid string"),
    ('[]', "body", r"valid dictionary"),
])
async def test_malformed_bodies_are_422_naming_the_field(client, body, field, pattern):
    response = await client.post("/v1/predict", content=body,
                                 headers={"content-type": "application/json"})
    assert_error(response, 422, "validation", field, pattern)


async def test_limits(model):
    async with served(model, max_inputs=3, max_chars=20, max_body_bytes=400) as client:
        response = await client.post("/v1/predict", json={"task": "sst", "inputs": ["a"] * 4})
        assert_error(response, 413, "payload_too_large", "inputs",
                     r"^inputs: 4 inputs, at most 3 per request$")
        response = await client.post("/v1/embed", json={"inputs": ["good", "x" * 21]})
        assert_error(response, 422, "validation", "inputs.1",
                     r"^inputs\.1: text longer than 20 characters$")
        response = await client.post("/v1/predict", json={"task": "sts",
                                                          "inputs": [["good", "y" * 21]]})
        assert_error(response, 422, "validation", "inputs.0", "longer than 20 characters")
        big = json.dumps({"task": "sst", "inputs": ["good movie " * 40]})
        response = await client.post("/v1/predict", content=big,
                                     headers={"content-type": "application/json"})
        assert_error(response, 413, "payload_too_large", "body",
                     rf"^body: {len(big)} bytes, at most 400$")

        async def chunks():  # no content-length: counted while read
            for _ in range(10):
                yield b"x" * 100

        response = await client.post("/v1/embed", content=chunks())
        assert_error(response, 413, "payload_too_large", "body",
                     r"^body: at least 500 bytes, at most 400$")
        assert (await client.post("/v1/predict", json={"task": "sst", "inputs": ["a"] * 3})
                ).status_code == 200


async def test_unknown_path_and_method_are_json(client):
    assert_error(await client.get("/v2/predict"), 404, "http", None, "Not Found")
    response = await client.get("/v1/predict")
    assert_error(response, 405, "http", None, "Method Not Allowed")
    assert response.headers["allow"] == "POST"


async def test_api_key(model):
    async with served(model, api_key=KEY) as client:
        request = {"task": "sst", "inputs": ["good"]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            response = await client.post("/v1/predict", json=request, headers=headers)
            assert_error(response, 401, "unauthorized", "Authorization",
                         "missing or wrong API key")
            assert response.headers["www-authenticate"] == "Bearer"
        # the key is checked before the body is read: a bad body without a key is still 401
        response = await client.post("/v1/predict", content="{", headers={})
        assert response.status_code == 401
        for path in ("/v1/tasks", "/metrics"):
            assert (await client.get(path)).status_code == 401
        good = {"Authorization": f"Bearer {KEY}"}
        assert (await client.post("/v1/predict", json=request, headers=good)).status_code == 200
        assert (await client.post("/v1/embed", json={"inputs": ["good"]}, headers=good)
                ).status_code == 200
        assert (await client.get("/metrics", headers=good)).status_code == 200
        for path in ("/health", "/", "/docs", "/openapi.json"):  # open: probes, page, docs
            assert (await client.get(path)).status_code == 200, path
        schema = (await client.get("/openapi.json")).json()
        assert schema["paths"]["/v1/predict"]["post"]["security"] == [{"HTTPBearer": []}]


def gate(model, monkeypatch):
    """Hold the model's `predict` until the returned event is set; a second event says
    when a forward pass has begun."""
    release, started, original = threading.Event(), threading.Event(), model.predict

    def held(*args, **kwargs):
        started.set()
        assert release.wait(20)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "predict", held)
    return release, started


async def test_full_queue_is_503_with_retry_after(model, monkeypatch):
    release, started = gate(model, monkeypatch)
    async with served(model, max_queue=2, max_inputs=2, max_wait_ms=0) as client:
        def post(inputs):
            return asyncio.create_task(
                client.post("/v1/predict", json={"task": "sst", "inputs": inputs}))

        running = post(["good"])  # taken by the worker, held in predict
        assert await asyncio.to_thread(started.wait, 10)
        queued = post(["bad", "fine"])  # waits in the queue: 2 inputs of 2
        while client.app.state.service.batcher.depth < 2:
            await asyncio.sleep(0.01)
        response = await client.post("/v1/predict", json={"task": "sst", "inputs": ["x"]})
        assert_error(response, 503, "overloaded", None,
                     r"^the queue holds 2 inputs; at most 2 may wait; retry later$")
        assert response.headers["retry-after"] == "1"
        # /health and /metrics answer while the model computes (it runs off the event loop)
        assert (await client.get("/health")).status_code == 200
        assert metric((await client.get("/metrics")).text, "mtbert_queue_depth") == 2
        release.set()
        assert [(await task).status_code for task in (running, queued)] == [200, 200]


async def test_requests_are_batched_across_clients(model, monkeypatch):
    """Concurrent requests of one task share one forward pass; of two tasks, one pass per
    task; each gets its own results."""
    calls = []
    original = model.predict

    def counted(task, inputs, batch_size=None):
        calls.append((task, len(inputs), batch_size))
        return original(task, inputs, batch_size)

    monkeypatch.setattr(model, "predict", counted)
    requests = [("sst", ["good movie"]), ("sst", ["awful film", "fine plot"]),
                ("sts", [["cat runs", "dog runs"]]), ("sst", ["bad"]),
                ("sts", [["red cat", "blue dog"], ["big", "small"]])]
    async with served(model, max_wait_ms=300, max_batch=16) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/predict", json={"task": task, "inputs": inputs})
            for task, inputs in requests))
        text = (await client.get("/metrics")).text
    assert sorted(calls) == [("sst", 4, 16), ("sts", 3, 16)]
    assert metric(text, 'mtbert_batch_size_sum{task="sst"}') == 4
    monkeypatch.undo()
    for (task, inputs), response in zip(requests, responses):
        got = response.json()["predictions"]
        expected = model.predict(task, inputs)
        assert len(got) == len(inputs)
        for one, want in zip(got, expected):
            assert one.get("label", one.get("score")) == pytest.approx(want.label, abs=1e-5)


async def test_a_failing_request_does_not_fail_its_batch(model, monkeypatch):
    original = model.predict

    def fragile(task, inputs, batch_size=None):
        if "dog" in inputs:
            raise RuntimeError("boom")
        return original(task, inputs, batch_size)

    monkeypatch.setattr(model, "predict", fragile)
    async with served(model, max_wait_ms=300) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/predict", json={"task": "sst", "inputs": inputs})
            for inputs in (["good"], ["dog"], ["bad movie"])))
    assert [r.status_code for r in responses] == [200, 500, 200]
    assert responses[1].json() == {"error": "internal error; the server log has the "
                                            "traceback", "error_type": "internal"}


async def test_an_error_outside_the_model_call_fails_its_batch_not_the_worker(model):
    """An exception after the forward pass (here in the metrics callback) answers that
    batch's requests with a JSON 500; the worker lives on and the next request succeeds."""
    async with served(model) as client:
        batcher = client.app.state.service.batcher
        observe, calls = batcher.on_batch, []

        def fails_once(*args):
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("metrics broke")
            observe(*args)

        batcher.on_batch = fails_once

        def post():
            return asyncio.wait_for(
                client.post("/v1/predict", json={"task": "sst", "inputs": ["good"]}), 10)

        assert_error(await post(), 500, "internal", None, "^internal error")
        assert (await post()).status_code == 200
        assert (await client.get("/health")).json() == {"status": "ready"}


async def test_health_is_503_and_requests_fail_fast_once_the_worker_is_gone(model):
    async with served(model) as client:
        client.app.state.service.batcher.stop()
        response = await client.get("/health")
        assert response.status_code == 503 and response.json() == {"status": "stopped"}
        response = await asyncio.wait_for(
            client.post("/v1/predict", json={"task": "sst", "inputs": ["good"]}), 10)
        assert_error(response, 503, "stopped", None, "batch worker has stopped")


async def test_a_request_past_its_timeout_is_504(model, monkeypatch):
    release, started = gate(model, monkeypatch)
    async with served(model, request_timeout_s=0.2) as client:
        response = await client.post("/v1/predict", json={"task": "sst", "inputs": ["good"]})
        assert started.is_set()
        assert_error(response, 504, "timeout", None, r"^no result within 0\.2 s")
        release.set()
        assert (await client.post("/v1/predict",
                                  json={"task": "sst", "inputs": ["good"]})).status_code == 200


# ---------------------------------------------------------------- the batcher alone

def recorder(calls, fail=None):
    def run(key, inputs):
        calls.append((key, list(inputs)))
        if fail in inputs:
            raise ValueError(f"cannot take {fail}")
        return [f"{key}:{value}" for value in inputs]
    return run


def test_batcher_fills_batches_up_to_max_batch_and_carries_the_rest():
    calls = []
    batcher = Batcher(recorder(calls), max_batch=4, max_wait_s=0.5, max_queue=100)
    futures = [batcher.submit("k", [f"{i}a", f"{i}b"]) for i in range(3)]
    futures.append(batcher.submit("k", ["3a", "3b", "3c", "3d", "3e"]))  # alone, too large
    batcher.start()
    assert futures[3].result(5) == ["k:3a", "k:3b", "k:3c", "k:3d", "k:3e"]
    batcher.stop()
    assert [len(inputs) for _, inputs in calls] == [4, 2, 5]
    assert futures[1].result() == ["k:1a", "k:1b"]
    assert batcher.depth == 0


def test_batcher_waits_at_most_max_wait_for_company():
    calls = []
    batcher = Batcher(recorder(calls), max_batch=64, max_wait_s=0.2, max_queue=100)
    batcher.start()
    start = time.monotonic()
    first = batcher.submit("k", ["a"])
    time.sleep(0.05)
    second = batcher.submit("k", ["b"])
    assert first.result(5) == ["k:a"] and second.result(5) == ["k:b"]
    elapsed = time.monotonic() - start
    batcher.stop()
    assert calls == [("k", ["a", "b"])]
    assert 0.15 < elapsed < 2


def test_batcher_one_call_per_key_and_errors_stay_with_their_request():
    calls = []
    batcher = Batcher(recorder(calls, fail="bad"), max_batch=64, max_wait_s=0.3, max_queue=100)
    good, other, bad = (batcher.submit("p", ["x"]), batcher.submit("q", ["y"]),
                        batcher.submit("p", ["bad"]))
    batcher.start()
    assert good.result(5) == ["p:x"] and other.result(5) == ["q:y"]
    with pytest.raises(ValueError, match="cannot take bad"):
        bad.result(5)
    batcher.stop()
    assert calls == [("p", ["x", "bad"]), ("p", ["x"]), ("p", ["bad"]), ("q", ["y"])]


def test_batcher_queue_limit_cancelled_jobs_and_draining_stop():
    calls = []
    batcher = Batcher(recorder(calls), max_batch=8, max_wait_s=0.0, max_queue=3)
    kept = batcher.submit("k", ["a", "b"])
    dropped = batcher.submit("k", ["c"])
    with pytest.raises(QueueFull, match="holds 3 inputs; at most 3 may wait"):
        batcher.submit("k", ["d"])
    assert batcher.depth == 3
    assert dropped.cancel()  # a client that went away: its inputs are not computed
    batcher.start()
    batcher.stop()  # everything submitted before stop() is answered
    assert kept.result(0) == ["k:a", "k:b"] and dropped.cancelled()
    assert calls == [("k", ["a", "b"])] and batcher.depth == 0


def test_batcher_survives_an_error_outside_the_model_call():
    calls = []
    batcher = Batcher(recorder(calls), max_batch=8, max_wait_s=0.0, max_queue=10,
                      on_batch=lambda key, size, seconds: 1 / 0 if len(calls) == 1 else None)
    batcher.start()
    with pytest.raises(ZeroDivisionError):
        batcher.submit("k", ["a"]).result(5)
    assert batcher.submit("k", ["b"]).result(5) == ["k:b"] and batcher.alive
    batcher.stop()
    assert not batcher.alive


# ---------------------------------------------------------------- settings and the command

@pytest.mark.parametrize("settings, message", [
    ({"max_batch": 0}, "--max-batch: must be at least 1"),
    ({"max_wait_ms": -1}, "--max-wait-ms: must be at least 0"),
    ({"request_timeout_s": 0}, "--request-timeout-s: must be more than 0"),
    ({"max_inputs": 10, "max_queue": 5}, r"--max-inputs \(10\) cannot exceed --max-queue"),
    ({"api_key": " "}, "the API key is empty"),
])
def test_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        ServeSettings(**settings)


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0"], "--max-batch: must be at least 1, got 0"),
    (["--api-key-env", "MTBERT_TEST_UNSET_KEY"],
     "--api-key-env MTBERT_TEST_UNSET_KEY: that environment variable is not set or empty"),
])
def test_serve_command_errors_are_one_line(tiny_run, capsys, monkeypatch, args, message):
    monkeypatch.delenv("MTBERT_TEST_UNSET_KEY", raising=False)
    assert main(["serve", str(tiny_run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mtbert serve: error: {message}"


def test_serve_command_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mtbert serve: error: {tmp_path / 'nothing'}: no such folder")
