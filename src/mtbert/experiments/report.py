"""One run's report: `RUN_DIR/report.html` with its plots as PNG files in `RUN_DIR/plots/`.

The page shows the resolved config, the training loss and dev metric curves from
`metrics.jsonl` (and, for mixture-of-experts encoders, a tasks x experts heat map of expert
load per layer; with `train.data_maps`, each classification task's data map), the run time and
parameter counts, and plots of the best model's dev outputs:
a confusion matrix per classification task, a histogram of the predicted probability by gold
class per binary classification task, and predicted-vs-gold scatter per regression task. The
dev outputs are computed on the dev examples the run was scored on (the run's
`train.max_eval_examples` subsample, if any), at most `DEFAULT_MAX_EXAMPLES` per task (a seeded
subsample: Quora's 20k dev pairs would take minutes on a CPU); `max_examples` overrides it
(0: all).

Optional TensorBoard: `write_tensorboard(run_dir)` turns `metrics.jsonl` into event files in
`RUN_DIR/tensorboard` when `tensorboard` is installed.
"""

from __future__ import annotations

import html
import json
import logging
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from mtbert.checkpoint import claim_output, write_checkpoint, write_text_atomically, written_whole

log = logging.getLogger(__name__)

PLOTS = "plots"
DEFAULT_MAX_EXAMPLES = 5000


class TensorBoardUnavailable(RuntimeError):
    """`tensorboard` is not installed."""


# ---------------------------------------------------------------- inputs


def read_metrics(run_dir: Path) -> list[dict]:
    """The evaluation records of `metrics.jsonl`, by step (a resumed run may repeat steps:
    the last record of a step wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def dev_outputs(model, tokenizer, config, data_dir: str | None = None,
                max_examples: int | None = None) -> dict[str, dict]:
    """For each task with a labelled dev split: {"outputs", "labels", "predicted", "total",
    "scores" (metric -> value)} or {"error"}."""
    from mtbert.data.batching import encode_split
    from mtbert.data.readers import DataError
    from mtbert.data.tasks import EVAL_SAMPLE_SEED, read_split, subsample
    from mtbert.evaluation import (
        head_outputs,
        metric_values,
        output_probabilities,
        to_predictions,
    )
    from mtbert.model.heads import is_siamese

    found = {}
    for name, task in model.tasks.items():
        try:
            examples = read_split(task, "dev", data_dir or config.data_dir,
                                  config.strict_data, config.max_skipped_share)
        except DataError as error:
            found[name] = {"error": str(error)}
            continue
        if not examples:
            found[name] = {"error": "the task has no dev split"}
            continue
        total = len(examples)
        examples = subsample(examples, example_limit(config, max_examples),
                             seed=EVAL_SAMPLE_SEED)
        encoded = encode_split(examples, tokenizer, is_siamese(task))
        raw = head_outputs(model, name, encoded, config.train.eval_batch_size,
                           tokenizer.pad_id)
        labels, predicted = encoded.labels.numpy(), to_predictions(task, raw).numpy()
        found[name] = {"outputs": output_probabilities(task, raw).numpy(), "labels": labels,
                       "predicted": predicted, "total": total,
                       "scores": metric_values(task, predicted, labels)}
    return found


def example_limit(config, max_examples: int | None) -> int | None:
    """Dev examples per task to plot: `max_examples` (0: all), else the run's own evaluation
    cap, at most `DEFAULT_MAX_EXAMPLES`."""
    if max_examples is not None:
        return max_examples or None
    cap = config.train.max_eval_examples
    return DEFAULT_MAX_EXAMPLES if cap is None else min(cap, DEFAULT_MAX_EXAMPLES)


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot_curves(records: list[dict], key: str, path: Path, title: str, ylabel: str,
                keep=lambda name: True) -> bool:
    """A line per name in `record[key]` against the step; False when there is nothing."""
    names = []
    for record in records:
        names += [n for n in record.get(key, {}) if keep(n) and n not in names]
    if not names:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name in names:
        points = [(r["step"], r[key][name]) for r in records if name in r.get(key, {})]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_confusion(labels: np.ndarray, predicted: np.ndarray, classes: int, path: Path,
                   title: str) -> np.ndarray:
    """Counts (gold x predicted), coloured by the share of each gold row."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(int), predicted.astype(int)), 1)
    shares = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
    plt = _pyplot()
    size = 2.2 + 0.6 * classes
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(classes):
        for j in range(classes):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.6 else "black")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of gold row")
    _save(fig, path)
    return matrix


def plot_histogram(labels: np.ndarray, probability: np.ndarray, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    bins = np.linspace(0, 1, 21)
    for gold in (0, 1):
        ax.hist(probability[labels == gold], bins=bins, alpha=0.6,
                label=f"gold {gold} (n={int((labels == gold).sum())})")
    ax.axvline(0.5, color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("predicted probability of class 1")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_scatter(labels: np.ndarray, scores: np.ndarray, label_range, path: Path,
                 title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.scatter(labels, scores, s=6, alpha=0.35 if len(labels) > 500 else 0.7)
    low, high = label_range or (float(labels.min()), float(labels.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("gold")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)


# ---------------------------------------------------------------- the page


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "task"


def plot_data_map(columns: dict[str, list[float]], path: Path, title: str) -> None:
    """Swayamdipta et al. 2020's map: variability (x) against confidence (y), coloured by
    correctness, one point per training example."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    points = ax.scatter(columns["variability"], columns["confidence"], c=columns["correctness"],
                        cmap="viridis", vmin=0, vmax=1, s=6,
                        alpha=0.4 if len(columns["row"]) > 500 else 0.8)
    ax.set_xlabel("variability (std of the gold-label probability)")
    ax.set_ylabel("confidence (mean gold-label probability)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.colorbar(points, ax=ax, label="correctness")
    _save(fig, path)


def _image(path: Path, alt: str) -> str:
    """An image of the run's `PLOTS` folder, by its file name."""
    return (f'<img src="{html.escape(f"{PLOTS}/{path.name}")}" '
            f'alt="{html.escape(alt)}">')


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def expert_loads(records: list[dict]) -> dict[int, tuple[int, list[list]]]:
    """From the last record's `train` values `TASK/moe_load.LAYER.EXPERT` and
    `TASK/moe_dropped.LAYER`: {layer: (experts, [[task, load per expert..., dropped]])}."""
    found: dict[int, dict[str, dict[int, float]]] = {}
    dropped: dict[tuple[int, str], float] = {}
    for key, value in (records[-1].get("train", {}) if records else {}).items():
        match = re.fullmatch(r"(.+)/moe_(load|dropped)\.(\d+)(?:\.(\d+))?", key)
        if match is None:
            continue
        task, kind, layer = match.group(1), match.group(2), int(match.group(3))
        if kind == "load":
            found.setdefault(layer, {}).setdefault(task, {})[int(match.group(4))] = value
        else:
            dropped[layer, task] = value
    tables = {}
    for layer in sorted(found):
        experts = 1 + max(e for by_expert in found[layer].values() for e in by_expert)
        tables[layer] = (experts, [[task, *(by_expert.get(e, 0.0) for e in range(experts)),
                                    dropped.get((layer, task), 0.0)]
                                   for task, by_expert in found[layer].items()])
    return tables


def _heat_table(header: list[str], rows: list[list]) -> str:
    """A table of shares whose cells are shaded by value (white 0 to dark blue 1)."""
    def cell(value) -> str:
        if isinstance(value, str):
            return f"<td>{html.escape(value)}</td>"
        light = round(255 * (1 - min(max(value, 0.0), 1.0)))
        colour = "#fff" if light < 128 else "#222"
        return (f'<td style="background: rgb({light}, {light}, 255); color: {colour}">'
                f"{value:.2f}</td>")

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_report(run_dir: str | Path, data_dir: str | None = None,
                 max_examples: int | None = None, overwrite: bool = False) -> Path:
    """Render `run_dir/report.html` (plots in `run_dir/plots/`); returns the page's path.
    A `plots/` folder holding more than an earlier report wrote there is replaced only with
    `overwrite` (`checkpoint.claim_output`); the old one stays until the new one is whole."""
    from mtbert.data_maps import FOLDER as DATA_MAPS_FOLDER
    from mtbert.data_maps import read_data_map
    from mtbert.evaluation import score_columns
    from mtbert.model_folder import load_model

    run_dir = Path(run_dir)
    claim_output(run_dir / PLOTS, overwrite=overwrite or written_whole(run_dir / PLOTS))
    model, tokenizer, config = load_model(run_dir)
    records = read_metrics(run_dir)
    best = _read_json(run_dir / "best" / "metrics.json")
    result = _read_json(run_dir / "result.json")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        config_file = run_dir / "best" / "experiment.yaml"
    title = f"mtbert run {config.name}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>Run folder <code>{html.escape(str(run_dir.resolve()))}</code>; backbone "
             f"<code>{html.escape(config.model.backbone)}</code>; report written "
             f"{datetime.now().isoformat(timespec='seconds')}.</p>"]

    # Summary: best dev scores, run time, parameters.
    parts.append('<h2 id="summary">Summary</h2>')
    if best:
        dev = best.get("dev", {})
        parts.append(f"<p>Best model: step {best.get('step')} (selected on the overall dev "
                     f"score).</p>")
        what = dict(score_columns(model.tasks))
        parts.append(_table(["task", "metric", "best dev score"],
                            [[n.split("/")[0], what.get(n, "mean"), f"{v:.4f}"]
                             for n, v in dev.items()]))
    parts.append('<h3 id="run-time">Run time</h3>')
    time_rows = []
    if records:
        time_rows.append(["training + evaluation (metrics.jsonl)",
                          f"{records[-1]['elapsed_s']:.1f} s", f"{records[-1]['step']} steps"])
    if result:
        time_rows.append(["whole run incl. loading (result.json)",
                          f"{result['wall_time_s']:.1f} s", f"{result['steps']} steps"])
    parts.append(_table(["what", "time", "length"], time_rows) if time_rows
                 else "<p>No timing recorded.</p>")
    encoder = sum(p.numel() for p in model.encoder.parameters())
    task_specific = sum(p.numel() for p in model.task_parameters())
    total = sum(p.numel() for p in model.parameters())
    parts.append('<h3 id="parameters">Parameters</h3>')
    parts.append(_table(["encoder", "task-specific (heads, conditioning)", "total"],
                        [[f"{encoder:,}", f"{task_specific:,}", f"{total:,}"]]))

    # Config.
    parts.append('<h2 id="config">Config</h2>')
    parts.append(f"<p><code>{html.escape(config_file.name)}</code>, the resolved config:</p>")
    parts.append(f"<pre>{html.escape(config_file.read_text(encoding='utf-8'))}</pre>")

    def write_plots(plots: Path) -> None:
        # Curves.
        parts.append('<h2 id="loss-curves">Training loss curves</h2>')
        path = plots / "loss_curves.png"
        if plot_curves(records, "train", path, "training losses (running average)", "loss",
                       keep=lambda n: n.endswith(("/loss", "/mnrl"))):
            parts.append("<p>Per task: the running average (factor 0.9) of the task loss, and of "
                         "its auxiliary MNRL loss if any, at each evaluation.</p>")
            parts.append(_image(path, "training loss curves"))
        else:
            parts.append("<p>No training records in metrics.jsonl.</p>")
        loads = expert_loads(records)
        if loads:
            parts.append('<h2 id="expert-load">Expert load</h2>')
            parts.append("<p>Mixture-of-experts layers: the share of each task's token-expert "
                         "assignments that each expert received (before capacity; running "
                         "average at the last evaluation), and the share dropped for capacity. "
                         "Uniform is 1/E per expert.</p>")
            for layer, (experts, rows) in loads.items():
                parts.append(f"<h3>Layer {layer}</h3>")
                parts.append(_heat_table(["task", *(f"expert {e}" for e in range(experts)),
                                          "dropped"], rows))
        parts.append('<h2 id="dev-curves">Dev metric curves</h2>')
        path = plots / "dev_curves.png"
        if plot_curves(records, "dev", path, "dev metrics", "score"):
            parts.append(_image(path, "dev metric curves"))
        else:
            parts.append("<p>No evaluation records in metrics.jsonl.</p>")
        path = plots / "loss_weights.png"
        varying = {k for r in records for k, v in r.get("weights", {}).items()
                   if v != records[0].get("weights", {}).get(k)}
        if varying and plot_curves(records, "weights", path, "loss weights", "weight"):
            parts.append('<h3 id="loss-weights">Loss weights</h3>')
            parts.append(_image(path, "loss weights"))

        maps = sorted((run_dir / DATA_MAPS_FOLDER).glob("*.csv"))
        if maps:
            parts.append('<h2 id="data-maps">Data maps</h2>')
            parts.append("<p>Per training example (<code>train.data_maps</code>; Swayamdipta et "
                         "al. 2020): the mean (confidence) and standard deviation (variability) "
                         "of the probability its training passes gave the gold label, and the "
                         "share of passes that predicted it (correctness). High confidence: easy "
                         "to learn; high variability: ambiguous; low confidence and variability: "
                         "hard to learn, or mislabelled.</p>")
        for csv_file in maps:
            columns = read_data_map(csv_file)
            passes = columns["passes"]
            path = plots / f"data_map_{_slug(csv_file.stem)}.png"
            plot_data_map(columns, path, f"{csv_file.stem}: data map")
            parts.append(f"<h3>{html.escape(csv_file.stem)}</h3><p>{len(passes)} training "
                         f"examples, drawn {min(passes):.0f} to {max(passes):.0f} times.</p>")
            parts.append(_image(path, f"{csv_file.stem} data map"))

        # Dev outputs of the best model.
        parts.append('<h2 id="dev-outputs">Dev outputs of the best model</h2>')
        outputs = dev_outputs(model, tokenizer, config, data_dir, max_examples)
        for name, task in model.tasks.items():
            found = outputs.get(name, {})
            slug = _slug(name)
            parts.append(f"<h3>{html.escape(name)}</h3>")
            if "error" in found:
                parts.append(f"<p>Skipped: {html.escape(found['error'])}</p>")
                continue
            labels, out = found["labels"], found["outputs"]
            of = ("" if len(labels) == found["total"]
                  else f" (a seeded subsample of {found['total']})")
            scores = ", ".join(f"{m} {v:.4f}" for m, v in found["scores"].items())
            parts.append(f"<p>{len(labels)} dev examples{of}; {scores}.</p>")
            if task.kind == "classification":
                predicted = found["predicted"]
                path = plots / f"confusion_{slug}.png"
                plot_confusion(labels, predicted, task.num_classes, path,
                               f"{name}: confusion matrix (dev)")
                parts.append(f'<h4 id="confusion-matrix-{slug}">Confusion matrix</h4>')
                parts.append(_image(path, f"{name} confusion matrix"))
                if task.num_classes == 2:
                    probability = out[:, 1]
                    path = plots / f"histogram_{slug}.png"
                    plot_histogram(labels, probability, path,
                                   f"{name}: predicted probability by gold class")
                    parts.append(f'<h4 id="histogram-{slug}">Score histogram</h4>')
                    parts.append(_image(path, f"{name} score histogram"))
            else:
                path = plots / f"scatter_{slug}.png"
                plot_scatter(labels, out, task.label_range, path,
                             f"{name}: predicted vs gold (" + ", ".join(
                                 f"{m} {v:.3f}" for m, v in found["scores"].items()) + ")")
                parts.append(f'<h4 id="scatter-{slug}">Predicted vs gold scatter</h4>')
                parts.append(_image(path, f"{name} predicted vs gold"))

    write_checkpoint(run_dir / PLOTS, write_plots)

    page = run_dir / "report.html"
    write_text_atomically(page, _PAGE.format(title=html.escape(title), body="\n".join(parts)))
    return page


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
        padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }}
th {{ background: #f3f3f3; }}
pre {{ background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }}
img {{ max-width: 100%; display: block; margin: 0.5rem 0 1.2rem; }}
</style></head>
<body>
{body}
</body></html>
"""


# ---------------------------------------------------------------- TensorBoard


def write_tensorboard(run_dir: str | Path, overwrite: bool = False) -> Path:
    """Scalars of `metrics.jsonl` (train losses, dev metrics, loss weights, lr) as TensorBoard
    event files in `run_dir/tensorboard`, rewritten each time as `write_report` rewrites
    `plots/`."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TensorBoardUnavailable(
            "TensorBoard is not installed, so no event files were written; "
            "`pip install tensorboard` to enable --tensorboard") from None
    run_dir = Path(run_dir)
    folder = claim_output(run_dir / "tensorboard",
                          overwrite=overwrite or written_whole(run_dir / "tensorboard"))

    def write(tmp: Path) -> None:
        writer = SummaryWriter(log_dir=str(tmp))
        for record in read_metrics(run_dir):
            step = record["step"]
            for group in ("train", "dev", "weights"):
                for name, value in record.get(group, {}).items():
                    writer.add_scalar(f"{group}/{name}", value, step)
            if "lr" in record:
                writer.add_scalar("lr", record["lr"], step)
        writer.close()

    return write_checkpoint(folder, write)
