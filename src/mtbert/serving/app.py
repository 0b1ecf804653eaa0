"""The HTTP server of `mtbert serve`: a FastAPI app in the shape of Hugging Face's
text-embeddings-inference (TEI): `POST /v1/predict`, `POST /v1/embed`, `GET /v1/tasks`,
`GET /health`, `GET /metrics` (Prometheus text), OpenAPI docs at `/docs` (Swagger UI served
from the `swagger-ui-bundle-v2` package, no CDN) and a page at `/`.

Requests are checked here, before they queue: an unknown task is a 404 naming the tasks;
too many inputs or too large a body a 413; a too-long text, a wrong arity or a malformed body
a 422; a full queue a 503 with `Retry-After`; a missing or wrong key (when one is set) a 401;
no result within `request_timeout_s` a 504; a batch worker that is gone a 503 (`/health` too).
Every error is JSON, `{"error": ..., "error_type": ..., "field": ...}` (TEI's `error` and
`error_type`, plus the offending field). Valid inputs go to the `Batcher`, which runs them with
other requests' inputs in one forward pass per task on its own thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mtbert import __version__
from mtbert.api import InputError, Model
from mtbert.serving.batching import Batcher, QueueFull, model_runner
from mtbert.serving.settings import ServeSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PROTECTED = ("/v1/", "/metrics")  # what needs the key when one is set
RETRY_AFTER_S = 1
DRAIN_S = 30.0  # SIGTERM: how long the requests in flight may take to finish


# ---------------------------------------------------------------- request and response bodies

class PredictRequest(BaseModel):
    task: str = Field(description="a task of `GET /v1/tasks`", examples=["sst"])
    inputs: list[str | list[str]] = Field(
        description="texts for single-sentence tasks, [text_a, text_b] pairs for pair tasks",
        examples=[["a gripping film", "a dull, lifeless plot"]])


class Prediction(BaseModel):
    label: str | None = Field(None, description="classification: the most probable class")
    label_id: int | None = Field(None, description="classification: its index")
    probabilities: dict[str, float] | None = Field(
        None, description="classification: every class's probability")
    score: float | None = Field(None, description="regression: the score, in the label range")


class PredictResponse(BaseModel):
    task: str
    kind: str = Field(description="classification or regression")
    predictions: list[Prediction]


class EmbedRequest(BaseModel):
    inputs: list[str] = Field(examples=[["a gripping film"]])
    normalize: bool = Field(True, strict=True,
                            description="unit length (cosine similarity = dot product)")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int


class TaskBody(BaseModel):
    name: str
    kind: str
    pair: bool
    labels: list[str] | None
    label_range: tuple[float, float] | None


class TasksResponse(BaseModel):
    tasks: list[TaskBody]
    embedding_task: str | None = Field(
        description="the task whose sentence embeddings /v1/embed gives (None: the plain "
                    "encoder, mean-pooled)")


class Health(BaseModel):
    status: str = Field(description="ready; loading (503) while the model loads; stopped "
                                    "(503) if the batch worker is gone")


class ErrorBody(BaseModel):
    error: str
    error_type: str
    field: str | None = None
    tasks: list[str] | None = Field(None, description="404 for an unknown task: the tasks")


class ApiError(Exception):
    """An error answered as `ErrorBody` JSON with `status`."""

    def __init__(self, status: int, error_type: str, error: str, field: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(error)
        self.status, self.headers = status, headers
        self.body = ErrorBody(error=error, error_type=error_type, field=field, **extra)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(exclude_none=True), self.status, self.headers)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an operation may answer."""
    return {status: {"model": ErrorBody} for status in statuses}


# ---------------------------------------------------------------- the model, its queue, metrics

class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in a
    process): requests by path and status, latency, batch sizes, queue depth."""

    def __init__(self, depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("mtbert_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("mtbert_request_duration_seconds", "HTTP request latency",
                                 ["path"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("mtbert_batch_size", "inputs per forward pass", ["task"],
                                    registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_seconds = Histogram("mtbert_batch_duration_seconds",
                                       "time of one forward pass (tokenizing included)",
                                       ["task"], registry=self.registry)
        Gauge("mtbert_queue_depth", "inputs waiting for a forward pass",
              registry=self.registry).set_function(depth)

    def observe_batch(self, key: tuple[str, Any], size: int, seconds: float) -> None:
        task = key[1] if key[0] == "predict" else "embed"
        self.batch_size.labels(task).observe(size)
        self.batch_seconds.labels(task).observe(seconds)


class Service:
    """The model and its batcher, once loaded (`start`), and the app's metrics."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.model: Model | None = None
        self.batcher: Batcher | None = None
        self.metrics = Metrics(lambda: self.batcher.depth if self.batcher else 0)

    def start(self, model: Model) -> None:
        settings = self.settings
        self.batcher = Batcher(model_runner(model, settings.max_batch), settings.max_batch,
                               settings.max_wait_ms / 1000, settings.max_queue,
                               self.metrics.observe_batch)
        self.batcher.start()
        self.model = model

    def stop(self) -> None:
        if self.batcher:
            self.batcher.stop()

    def status(self) -> str:
        if self.model is None:
            return "loading"
        return "ready" if self.batcher.alive else "stopped"

    def ready(self) -> Model:
        if self.model is None:
            raise ApiError(503, "loading", "the model is still loading",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if not self.batcher.alive:
            raise ApiError(503, "stopped", "the batch worker has stopped; restart the server")
        return self.model

    async def run(self, key: tuple[str, Any], inputs: list) -> list:
        """The batcher's results for `inputs`; 504 after `request_timeout_s` (a request
        still queued then is dropped, one already running is left to finish)."""
        try:
            future = self.batcher.submit(key, inputs)
        except QueueFull as error:
            raise ApiError(503, "overloaded", f"{error}; retry later",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            raise ApiError(504, "timeout", f"no result within {timeout:g} s "
                           "(--request-timeout-s)") from None

    def check(self, model: Model, task: str | None, inputs: list) -> None:
        """413 for too many inputs, 422 for a too-long, empty or mistyped text or a wrong
        arity (`Model.examples` checks the last three as `predict` would)."""
        settings = self.settings
        if len(inputs) > settings.max_inputs:
            raise ApiError(413, "payload_too_large", f"inputs: {len(inputs)} inputs, at most "
                           f"{settings.max_inputs} per request", "inputs")
        for i, value in enumerate(inputs):
            lengths = [len(value)] if isinstance(value, str) else map(len, value)
            if max(lengths, default=0) > settings.max_chars:
                raise ApiError(422, "validation", f"inputs.{i}: text longer than "
                               f"{settings.max_chars} characters", f"inputs.{i}")
        try:
            model.examples(task, inputs)
        except InputError as error:
            raise ApiError(422, "validation", f"inputs.{error.index}: {error.reason}",
                           f"inputs.{error.index}") from None


# ---------------------------------------------------------------- middleware

class Limits:
    """The key (401) and the body size (413), checked before a route reads the body."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        try:
            self.check_key(scope["path"], headers.get(b"authorization", b""))
            body = await self.read_body(headers, receive)
        except ApiError as error:
            return await error.response()(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def check_key(self, path: str, authorization: bytes) -> None:
        key = self.settings.api_key
        if key is None or not path.startswith(PROTECTED):
            return
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(),
                                                                     key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send the header "
                           "'Authorization: Bearer KEY'", "Authorization",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            raise self.too_large(int(declared))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise self.too_large(size, "at least ")
            more = message.get("more_body", False)
        return b"".join(chunks)

    def too_large(self, size: int, qualifier: str = "") -> ApiError:
        return ApiError(413, "payload_too_large", f"body: {qualifier}{size} bytes, at most "
                        f"{self.settings.max_body_bytes}", "body")


class Measure:
    """Counts every response by path and status and times it (outermost, so that 401s and
    413s count too); paths outside the app's routes count as "other"."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


# ---------------------------------------------------------------- the app

def create_app(model: Model | None, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving `model`; None: not loaded yet (`/health` answers 503 until
    `app.state.service.start(model)`)."""
    settings = settings or ServeSettings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if model is not None:
            service.start(model)
        yield
        service.stop()  # after uvicorn has drained the requests in flight

    app = FastAPI(title="mtbert", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  summary="One BERT encoder, several tasks: predictions and sentence embeddings")
    app.state.service = service
    # documents the bearer scheme in OpenAPI; `Limits` enforces it, before the body is read
    secured = [Depends(HTTPBearer(auto_error=False))] if settings.api_key else []
    unauthorized = (401,) if settings.api_key else ()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return ApiError(error.status_code, "http", str(error.detail),
                        headers=error.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return ApiError(500, "internal", "internal error; the server log has the "
                        "traceback").response()

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
              dependencies=secured, responses=errors(400, *unauthorized, 404, 413, 422, 503),
              summary="Labels with probabilities, or scores, for texts or text pairs")
    async def predict(request: PredictRequest) -> dict[str, Any]:
        model = service.ready()
        if request.task not in model.tasks:
            raise ApiError(404, "not_found", f"unknown task {request.task!r}; this model's "
                           f"tasks: {', '.join(model.tasks)}", "task", tasks=list(model.tasks))
        service.check(model, request.task, request.inputs)
        results = await service.run(("predict", request.task), request.inputs)
        kind = model.tasks[request.task].kind
        return {"task": request.task, "kind": kind, "predictions": [
            {"score": p.label} if kind == "regression" else
            {"label": p.label, "label_id": p.label_id, "probabilities": p.probabilities}
            for p in results]}

    @app.post("/v1/embed", response_model=EmbedResponse, dependencies=secured,
              responses=errors(400, *unauthorized, 413, 422, 503),
              summary="Sentence embeddings, pooled as the model's siamese task was trained")
    async def embed(request: EmbedRequest) -> dict[str, Any]:
        model = service.ready()
        service.check(model, None, request.inputs)
        vectors = await service.run(("embed", request.normalize), request.inputs)
        return {"embeddings": vectors.tolist(), "dimension": vectors.shape[1]}

    @app.get("/v1/tasks", response_model=TasksResponse, dependencies=secured,
             responses=errors(*unauthorized, 503), summary="The model's tasks and their labels")
    async def tasks() -> dict[str, Any]:
        model = service.ready()
        return {"tasks": [{"name": t.name, "kind": t.kind, "pair": t.pair, "labels": t.labels,
                           "label_range": t.label_range} for t in model.tasks.values()],
                "embedding_task": model.embedding_task}

    @app.get("/health", response_model=Health, responses={503: {"model": Health}},
             summary="200 once the model is loaded and while it can answer, 503 else")
    async def health() -> Any:
        status = service.status()
        return {"status": status} if status == "ready" else JSONResponse({"status": status}, 503)

    @app.get("/metrics", dependencies=secured, responses=errors(*unauthorized),
             response_class=Response, summary="Prometheus metrics (text format)")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="mtbert API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    from swagger_ui_bundle import swagger_ui_path

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
    app.add_middleware(Limits, settings=settings)
    app.add_middleware(Measure, metrics=service.metrics,
                       paths={route.path for route in app.routes})
    return app


def validation_error(error: RequestValidationError) -> ApiError:
    """FastAPI's list of body errors as one 422 naming the first offending field."""
    first = error.errors()[0]
    location = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        location = []
    # a body field and its list indices; later parts name union branches ("str", "list[str]")
    kept = location[:1] + list(itertools.takewhile(lambda part: isinstance(part, int),
                                                   location[1:]))
    field = ".".join(map(str, kept)) or "body"
    more = len(error.errors()) - 1
    return ApiError(422, "validation", f"{field}: {first.get('msg', 'invalid')}"
                    + (f" (and {more} more errors)" if more else ""), field)


def serve(load: Callable[[], Model], settings: ServeSettings, host: str, port: int) -> None:
    """Listen on `host:port` at once (`/health` answers 503 while `load()` runs on a thread),
    then serve the model it returns. SIGTERM or Ctrl-C: stop accepting connections, let the
    requests in flight finish (at most `DRAIN_S`), stop the batcher, exit. A load that fails
    stops the server and raises its error."""
    import uvicorn

    app = create_app(None, settings)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False,
                                           timeout_graceful_shutdown=DRAIN_S))

    async def main() -> None:
        serving = asyncio.create_task(server.serve())
        loading = asyncio.ensure_future(asyncio.to_thread(load))
        await asyncio.wait({serving, loading}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and loading.exception() is None:
            app.state.service.start(loading.result())
            log.info("model loaded; ready (tasks: %s)", ", ".join(loading.result().tasks))
        elif loading.done():
            server.should_exit = True
        await serving
        if loading.done() and loading.exception() is not None:
            raise loading.exception()

    try:
        asyncio.run(main())
    except SystemExit as exit_:  # uvicorn exits when it cannot listen or start
        if exit_.code:
            raise OSError(f"could not serve on {host}:{port} (the log above says why)") from None
