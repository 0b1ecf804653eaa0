"""Serving under load: `mtbert serve` (fp32 and int8, batching across requests) against the
naive server (FastAPI calling a `transformers` model once per request), loopback only.

    python benchmarks/bench_serve.py RUN_DIR [--task sst] [--concurrency 1 8 32]
        [--requests 600] [--max-seconds 60] [--data-dir DIR] [--smoke]

Every contender is a uvicorn server in its own process on 127.0.0.1; the client is this
process (asyncio, one keep-alive HTTP/1.1 connection per concurrent client). Each request
carries one sentence of the task's dev split (in a fixed shuffled order, the same for
everyone) and must come back 200 with one prediction, else it counts as an error.

- mtbert fp32 / int8: `mtbert serve RUN_DIR [--quantize int8]`, default batching
  (`--max-batch 64 --max-wait-ms 5`).
- naive, transformers: the run exported with `mtbert export --format hf`, loaded as
  `transformers.BertModel` + `BertTokenizerFast`; the task's head (its pooling and MLP, from
  `mtbert_heads.safetensors`) applied in plain torch; one forward pass per request in a plain
  `def` endpoint, so FastAPI runs requests in its thread pool, in parallel. Its outputs are
  checked against `mtbert.load(RUN_DIR).predict` before anything is timed.

Cells are interleaved (for each concurrency, every contender in turn) after 20 warm-up
requests each; a cell stops after `--requests` requests or `--max-seconds`. Reported:
requests/s, p50 and p99 latency, errors, mtbert's throughput over the naive server's, and
for mtbert the mean inputs per forward pass and its time (from the server's `/metrics`).
The contenders share the machine's cores with this client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bench_train import markdown_table
from pydantic import BaseModel

WARMUP = 20
CHECK_TEXTS = 8
NAIVE = "naive transformers (thread pool)"


# ---------------------------------------------------------------- the naive server

class NaiveModel:
    """`transformers.BertModel` of an hf export + one task's head in plain torch."""

    def __init__(self, folder: Path, task: str):
        import yaml
        from safetensors.torch import load_file
        from transformers import BertModel, BertTokenizerFast

        self.tokenizer = BertTokenizerFast.from_pretrained(folder)
        self.encoder = BertModel.from_pretrained(folder).eval()
        spec = next(t for t in yaml.safe_load((folder / "experiment.yaml").read_text())["tasks"]
                    if t["name"] == task)
        if spec["head"]["type"] != "classifier" or spec["kind"] != "classification":
            raise SystemExit(f"bench_serve: the naive server runs classifier heads of "
                             f"classification tasks; {task} has a {spec['head']['type']} head")
        self.pooling, self.labels = spec["head"]["pooling"], spec["label_names"]
        heads = load_file(folder / "mtbert_heads.safetensors")
        prefix = f"heads.{task}.net."
        layers = sorted({int(k[len(prefix):].split(".")[0]) for k in heads if k.startswith(prefix)})
        modules: list[torch.nn.Module] = []
        for index in layers:  # mtbert's MLP: linear -> ReLU -> ... -> linear (dropout is off)
            weight, bias = heads[f"{prefix}{index}.weight"], heads[f"{prefix}{index}.bias"]
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
            linear.load_state_dict({"weight": weight, "bias": bias})
            modules += [linear, torch.nn.ReLU()]
        self.head = torch.nn.Sequential(*modules[:-1]).eval()

    @torch.inference_mode()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = self.encoder(**batch)
        if self.pooling == "pooler":
            vectors = out.pooler_output
        elif self.pooling == "cls":
            vectors = out.last_hidden_state[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).float()
            vectors = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(vectors).softmax(-1)


class NaiveRequest(BaseModel):
    task: str
    inputs: list[str]


def naive_server(folder: Path, task: str) -> None:
    """The naive server: `POST /v1/predict` as mtbert's (same request and response shape),
    one forward pass per request, in FastAPI's thread pool (a `def` endpoint); `GET /health`."""
    import uvicorn
    from fastapi import FastAPI

    model = NaiveModel(folder, task)
    app = FastAPI()

    def predict(request: NaiveRequest) -> dict:
        rows = model.probabilities(request.inputs).tolist()
        return {"task": task, "kind": "classification", "predictions": [
            {"label": model.labels[int(np.argmax(row))], "label_id": int(np.argmax(row)),
             "probabilities": dict(zip(model.labels, row))} for row in rows]}

    app.post("/v1/predict")(predict)
    app.get("/health")(lambda: {"status": "ready"})
    uvicorn.run(app, host="127.0.0.1", port=0, access_log=False)


# ---------------------------------------------------------------- servers and the client

class Server:
    """A server process; `url` once uvicorn says where it listens."""

    def __init__(self, name: str, command: list[str]):
        self.name = name
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.process.stdout),
                         daemon=True).start()
        self.url = ""

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            found = [m for line in list(self.log)
                     if (m := re.search(r"Uvicorn running on (http://\S+)", line))]
            if found:
                self.url = found[0].group(1)
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise SystemExit(f"bench_serve: {self.name} did not become ready:\n{''.join(self.log)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class Cell:
    done: int
    errors: int
    seconds: float
    latencies: np.ndarray
    batches: tuple[float, float] | None = None  # mtbert: mean inputs and ms per forward pass

    @property
    def throughput(self) -> float:
        return self.done / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if len(self.latencies) else 0.0


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON: the load generator. (httpx spends
    ~4.6 ms of CPU per request on this machine, which on 2 shared cores would cap every
    server near 160 requests/s; this spends ~0.05 ms.)"""

    def __init__(self, url: str):
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: object) -> tuple[int, bytes]:
        """(status, body); raises OSError or ValueError when the exchange breaks."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                          + body)
        try:
            status = int((await self.reader.readline()).split()[1])
            length = None
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise ValueError("a response without Content-Length")
            return status, await self.reader.readexactly(length)
        except (IndexError, asyncio.IncompleteReadError) as error:
            raise ValueError(f"a broken response: {error}") from None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def load(url: str, task: str, texts: list[str], concurrency: int, requests: int,
               max_seconds: float) -> Cell:
    """`requests` requests of one text each from `concurrency` clients (stopping at
    `max_seconds`); a non-200 answer, a wrong count or a transport error is an error."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    async def client_loop() -> None:
        nonlocal errors, sent
        connection = Connection(url)
        while sent < requests and time.perf_counter() < deadline:
            text = texts[sent % len(texts)]
            sent += 1
            began = time.perf_counter()
            try:
                status, body = await connection.post("/v1/predict",
                                                     {"task": task, "inputs": [text]})
                ok = status == 200 and len(json.loads(body)["predictions"]) == 1
            except (OSError, ValueError, KeyError):
                connection.close()
                ok = False
            if ok:
                latencies.append(time.perf_counter() - began)
            else:
                errors += 1
        connection.close()

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return Cell(len(latencies), errors, time.perf_counter() - start, np.array(latencies))


def batch_totals(url: str, task: str) -> np.ndarray | None:
    """mtbert's forward passes so far, from `/metrics`: [inputs, passes, seconds] (None for
    the naive server, which has no metrics)."""
    import httpx

    response = httpx.get(url + "/metrics", timeout=30)
    if response.status_code != 200:
        return None
    values = dict(re.findall(rf'^mtbert_batch_(\w+)\{{task="{re.escape(task)}"\}} (\S+)$',
                             response.text, re.MULTILINE))
    return np.array([float(values.get(name, 0)) for name in
                     ("size_sum", "size_count", "duration_seconds_sum")])


def measure(url: str, task: str, texts: list[str], concurrency: int, requests: int,
            max_seconds: float) -> Cell:
    """One cell: `load`, plus the mean batch size and forward time of mtbert's server."""
    before = batch_totals(url, task)
    cell = asyncio.run(load(url, task, texts, concurrency, requests, max_seconds))
    if before is not None:
        inputs, passes, seconds = batch_totals(url, task) - before
        cell.batches = (inputs / passes, 1000 * seconds / passes)
    return cell


def served_probabilities(url: str, task: str, texts: list[str]) -> np.ndarray:
    import httpx

    response = httpx.post(url + "/v1/predict", json={"task": task, "inputs": texts},
                          timeout=60)
    response.raise_for_status()
    return np.array([list(p["probabilities"].values())
                     for p in response.json()["predictions"]])


# ---------------------------------------------------------------- the benchmark

def check_naive_equals_mtbert(model, export: Path, task: str, texts: list[str]) -> float:
    """Max |naive - mtbert| class probability on `texts`; exits when over 1e-4."""
    ours = np.array([list(p.probabilities.values()) for p in model.predict(task, texts)])
    theirs = NaiveModel(export, task).probabilities(texts).numpy()
    difference = float(np.abs(ours - theirs).max())
    if difference > 1e-4:
        raise SystemExit(f"bench_serve: the naive model differs from mtbert by {difference:.2e}")
    return difference


def dev_texts(model, task: str, data_dir: str | None, seed: int = 0) -> list[str]:
    """The task's dev sentences (first text column) in a fixed shuffled order."""
    from mtbert.data.tasks import read_split

    examples = read_split(model.model.tasks[task], "dev", data_dir or model.config.data_dir)
    texts = [e.texts[0] for e in examples]
    return [texts[i] for i in np.random.default_rng(seed).permutation(len(texts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, nargs="?", help="a run, its best/, or an export")
    parser.add_argument("--task", default="sst", help="a classification task with a "
                                                      "classifier head (default: sst)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=600, help="per cell (at most 2000)")
    parser.add_argument("--max-seconds", type=float, default=60, help="per cell (at most 60)")
    parser.add_argument("--data-dir", help="task files (default: the run's data_dir)")
    parser.add_argument("--smoke", action="store_true", help="20 requests a cell, 1 and 4")
    parser.add_argument("--naive-server", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        return naive_server(args.naive_server, args.task)
    if args.run is None:
        parser.error("RUN_DIR is required")
    if args.smoke:
        args.requests, args.concurrency = 20, [1, 4]
    args.requests, args.max_seconds = min(args.requests, 2000), min(args.max_seconds, 60)

    import mtbert
    from mtbert.export import export

    model = mtbert.load(args.run)
    texts = dev_texts(model, args.task, args.data_dir)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        hf = export(args.run, Path(tmp) / "hf", "hf").folder
        difference = check_naive_equals_mtbert(model, hf, args.task, texts[:CHECK_TEXTS])
        del model
        print(f"naive (transformers BertModel + head) vs mtbert.load().predict, "
              f"{CHECK_TEXTS} {args.task} dev sentences: max |probability difference| "
              f"{difference:.2e}")
        mtbert_serve = [sys.executable, "-m", "mtbert", "serve", str(args.run), "--port", "0"]
        naive = [sys.executable, __file__, "--naive-server", str(hf), "--task", args.task]
        commands = {"mtbert serve fp32": mtbert_serve,
                    "mtbert serve int8": [*mtbert_serve, "--quantize", "int8"],
                    NAIVE: naive}
        servers = [Server(name, command) for name, command in commands.items()]
        try:
            for server in servers:
                server.wait_ready()
            report(servers, texts, args)
        finally:
            for server in servers:
                server.stop()


def report(servers: list[Server], texts: list[str], args: argparse.Namespace) -> None:
    reference = served_probabilities(servers[0].url, args.task, texts[:CHECK_TEXTS])
    for server in servers[1:]:
        difference = np.abs(served_probabilities(server.url, args.task,
                                                 texts[:CHECK_TEXTS]) - reference).max()
        print(f"{server.name} vs {servers[0].name}: max |probability difference| over HTTP "
              f"{difference:.2e}")
    for server in servers:
        asyncio.run(load(server.url, args.task, texts, 1, WARMUP, 60))
    cells: dict[tuple[str, int], Cell] = {}
    for concurrency in args.concurrency:
        for server in servers:
            cell = cells[server.name, concurrency] = measure(
                server.url, args.task, texts, concurrency, args.requests, args.max_seconds)
            print(f"{server.name}, concurrency {concurrency}: {cell.throughput:.1f} "
                  f"requests/s", file=sys.stderr)
    rows = []
    for concurrency in args.concurrency:
        for server in servers:
            cell = cells[server.name, concurrency]
            ratio = cell.throughput / cells[NAIVE, concurrency].throughput
            batch, forward = cell.batches or ("-", "-")
            rows.append([server.name, str(concurrency), str(cell.done), str(cell.errors),
                         f"{cell.seconds:.1f}", f"{cell.throughput:.1f}",
                         f"{cell.percentile(50):.1f}", f"{cell.percentile(99):.1f}",
                         f"{ratio:.2f}x", f"{batch:.1f}" if cell.batches else batch,
                         f"{forward:.1f}" if cell.batches else forward])
    print(f"\n{args.task} dev sentences, one per request; up to {args.requests} requests or "
          f"{args.max_seconds:.0f} s per cell; {os.cpu_count()} CPUs; torch "
          f"{torch.__version__}\n")
    print(markdown_table(["server", "concurrency", "requests", "errors", "seconds",
                          "requests/s", "p50 ms", "p99 ms", "vs naive", "mean batch",
                          "ms per batch"], rows))
    errors = sum(cell.errors for cell in cells.values())
    print(f"\nerrors over the run: {errors}")


if __name__ == "__main__":
    main()
