"""The composition matrix (issue 36): every pair of features either trains, resumes and ships
together on the tiny backbone, or is refused in one line that names both.

Each feature is declared once (`FEATURES`): a *technique* is config settings plus what it
adds (parameters that must learn, auxiliary terms that must reach the final loss); an
*action* is something done with a run (train it on 2 processes, resume it, add a task to it,
merge it, export it, serve it). A pair of techniques trains with both; a technique and an
action do the action on a run of the technique; two actions chain (`ACTIONS` order: the
earlier one makes the run the later one acts on). `tests/test_composition.py` checks every
pair; this module says what each cell checked and writes the table into
docs/architecture.md:

    python tests/composition.py      # runs the matrix (a few minutes) and rewrites the table
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
DOCS = TESTS.parent / "docs" / "architecture.md"
BEGIN, END = "<!-- composition matrix: begin -->", "<!-- composition matrix: end -->"
STEPS, RESUME_FROM = 4, 2  # each run trains STEPS steps; a resume starts at RESUME_FROM


@dataclass(frozen=True)
class Feature:
    """A technique (`overrides`) or an action (`action`: its place in `ACTIONS`).

    `learns`: name prefixes of parameters it adds, each of which must get a gradient;
    `idle`: prefixes of parameters that may get none (an expert no task routes to);
    `auxiliary`: the auxiliary terms it adds, each of which must get a gradient from the
    final loss; `leaves`: files (globs in the run folder) it writes at the end of training,
    which a resumed run must write again byte for byte; `logs`: keys it adds to the last
    `metrics.jsonl` record; `mentions`: words by which a refusal names it (any one
    suffices)."""

    label: str
    short: str
    mentions: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    learns: tuple[str, ...] = ()
    auxiliary: tuple[str, ...] = ()
    idle: tuple[str, ...] = ()
    leaves: tuple[str, ...] = ()
    logs: tuple[str, ...] = ()
    action: bool = False

    def keys(self) -> set[str]:
        return {override.split("=", 1)[0] for override in self.overrides}


TEACHER = "{teacher}"  # the teacher file's path, filled in by `Setup.overrides`
FEATURES: dict[str, Feature] = {
    "token_moe": Feature(
        "token MoE", "tMoE", ("moe", "mixture of experts"),
        ("model.moe={experts: 2, every: 1, routing: token}",),
        ("encoder.layers.0.feed_forward.experts.", "encoder.layers.0.feed_forward.gate."),
        ("moe_balance", "moe_z")),
    "task_moe": Feature(
        "task MoE", "kMoE", ("moe", "mixture of experts"),
        ("model.moe={experts: 2, every: 1, routing: task, capacity_factor: null, "
         "noisy_gating: false, balance_weight: 0.0}",),
        ("encoder.layers.0.feed_forward.experts.", "routing."), ("moe_z",),
        ("encoder.layers.0.feed_forward.experts.", "encoder.layers.1.feed_forward.experts.")),
    "lora": Feature("LoRA", "LoRA", ("lora", "conditioning", "adapter"),
                    ("model.conditioning=lora", "model.conditioning_options={rank: 2}"),
                    ("conditioning.",)),
    "mtl_lora": Feature("MTL-LoRA", "MTL", ("mtl_lora", "conditioning", "adapter"),
                        ("model.conditioning=mtl_lora",
                         "model.conditioning_options={rank: 2, up_projections: 2}"),
                        ("conditioning.",)),
    "pals": Feature("PALs", "PALs", ("pals", "conditioning"),
                    ("model.conditioning=pals", "model.conditioning_options={rank: 4, heads: 2}"),
                    ("conditioning.",)),
    "task_embeddings": Feature("task embeddings", "TEmb", ("input", "conditioning"),
                               ("model.conditioning=input",), ("conditioning.",)),
    "distillation": Feature("distillation", "Dist", ("distill", "teacher"),
                            (f"distill.teachers={{quora: {TEACHER}}}",)),
    "uncertainty": Feature("uncertainty", "Unc", ("uncertainty", "weighting"),
                           ("train.weighting=uncertainty",), ("weighting.",)),
    "gradnorm": Feature("GradNorm", "GN", ("gradnorm", "weighting"),
                        ("train.weighting=gradnorm",), ("weighting.",)),
    "dwa": Feature("DWA", "DWA", ("dwa", "weighting"), ("train.weighting=dwa", "train.epochs=3")),
    "pcgrad": Feature("PCGrad", "PCG", ("pcgrad", "combiner"), ("train.combiner=pcgrad",)),
    "mnrl": Feature("MNRL", "MNRL", ("mnrl",),
                    ("tasks.quora.mnrl={rule: label, start: 0.5}",), auxiliary=("mnrl",)),
    "accumulation": Feature("gradient accumulation", "Acc", ("grad_accumulation",),
                            ("train.grad_accumulation=2",)),
    "bf16": Feature("bf16", "bf16", ("bf16", "precision"), ("train.precision=bf16",)),
    "smart": Feature("SMART", "SMART", ("smart", "regularizer"),
                     ("train.regularizers=[{name: smart, weight: 1.0}, "
                      "{name: smart_proximal, weight: 1.0}]",),
                     auxiliary=("smart", "smart_proximal")),
    "ema": Feature("EMA weights", "EMA", ("weight_average", "ema"),
                   ("train.weight_average={method: ema, decay: 0.5}",)),
    "swa": Feature("SWA weights", "SWA", ("weight_average", "swa"),
                   ("train.weight_average={method: swa, start: 0.5}",)),
    "tag": Feature("TAG look-ahead affinity", "TAG", ("affinity", "look-ahead"),
                   ("train.affinity_every=2",), logs=("affinity",)),
    "data_maps": Feature("data maps", "DMap", ("data_maps", "data map"),
                         ("train.data_maps=true",), leaves=("data_maps/*.csv",)),
    # actions, in the order in which they chain
    "processes": Feature("2 processes", "2P", ("process", "world size", "rank"), action=True),
    "resume": Feature("resume", "Res", ("resume", "checkpoint"), action=True),
    "add_task": Feature("add a task", "Add", ("--from", "from_run"), action=True),
    "finetune": Feature("fine-tune a task (two-stage)", "Fin", ("finetune",), action=True),
    "merge": Feature("merge", "Mrg", ("merge",), action=True),
    "export": Feature("export hf / onnx", "Exp", ("export", "format"), action=True),
    "serve": Feature("serve", "Srv", ("serve",), action=True),
}
ACTIONS = [name for name, feature in FEATURES.items() if feature.action]
TECHNIQUES = [name for name, feature in FEATURES.items() if not feature.action]
PAIRS = list(combinations(FEATURES, 2))  # techniques first, actions in chain order

SIAMESE = ["tasks.quora.head={type: pair_features, pooling: mean}",
           "tasks.sts.head={type: cosine, pooling: mean}"]
BASE = ["train.batch_size=8",
        f"train.max_steps={STEPS}", f"train.checkpoint_every={RESUME_FROM}",
        "train.max_eval_examples=16"]
TASKS = "[sst, quora, sts]"
# With the encoder frozen (train --from) a cosine head would leave STS nothing to train.
ADDED_HEAD = ("tasks.sts.head={type: pair_features, pooling: mean}",)
OLD_TASK = "[{preset: sst, name: sst_old}]"  # the run a task is added to
FINETUNED = "quora"  # the task fine-tuned alone (MT-DNN's second stage)
PARTNER_TASK = "[{preset: sst, name: sst_merged}]"  # the run merged with a run of the matrix


def model_settings(techniques: tuple[str, ...]) -> tuple[str, ...]:
    """The techniques' `model.*` settings: what runs added to or merged with must share."""
    return tuple(o for name in techniques for o in FEATURES[name].overrides
                 if o.startswith("model."))


def one_key(a: str, b: str) -> set[str]:
    """The settings both features write: such a pair is one choice of that setting."""
    return FEATURES[a].keys() & FEATURES[b].keys()


# ---------------------------------------------------------------- outcomes


class Refused(Exception):
    """A pair was refused where refusing is allowed (config read, an action's command)."""


@dataclass
class Outcome:
    """What a cell found: `checked` (what was verified) or `refused` (the message)."""

    checked: str = ""
    refused: str = ""
    notes: list[str] = field(default_factory=list)


def refusal(error: Exception, *names: str) -> Refused:
    """`error` as a refusal of `names`' pair, after checking it is one line naming both."""
    assert names, f"not a refusal of a pair: {error}"
    message = str(error)
    assert "\n" not in message, f"a refusal must be one line: {message!r}"
    for name in names:
        assert any(word.lower() in message.lower() for word in FEATURES[name].mentions), (
            f"the refusal does not name {FEATURES[name].label}: {message}")
    return Refused(message)


# ---------------------------------------------------------------- one run, checked


class GradientLog:
    """Which trainable parameters and auxiliary terms got a non-zero gradient in a run."""

    def __init__(self, trainer):
        every = dict(trainer.model.named_parameters())
        every.update({f"weighting.{n}": p for n, p in trainer.weighting.named_parameters()})
        self.names = list(every)  # frozen ones too (train --from freezes the encoder)
        self.params = {n: p for n, p in every.items() if p.requires_grad}
        self.frozen_encoder = trainer.config.adapt.freeze_encoder
        # BERT's pooler learns only where a head pools with it (a fine-tuned siamese task
        # alone does not).
        self.may_idle = () if any(task.head.pooling == "pooler" for task in
                                  trainer.config.tasks) else ("encoder.pooler.",)
        self.learned: set[str] = set()
        self.terms: dict[str, list[float]] = {}
        trainer.optimizer.register_step_pre_hook(lambda *_: self.learned.update(
            n for n, p in self.params.items() if p.grad is not None and bool(p.grad.ne(0).any())))
        # Each task's auxiliary terms are watched; TAG's look-ahead calls `task_loss`, the
        # task's loss alone, which makes no term (it trains nothing).
        trainer.losses = {task: WatchedProxy(loss, self, 1)
                          for task, loss in trainer.losses.items()}
        trainer.regularizers = WatchedProxy(trainer.regularizers, self, None)

    def watched(self, function: Callable, position: int | None) -> Callable:
        """`function` whose auxiliary terms (`position` of its result; None: the result)
        record the gradient the final loss gives them."""
        def call(*args, **kwargs):
            result = function(*args, **kwargs)
            self.watch(result if position is None else result[position])
            return result
        return call

    def watch(self, terms: dict) -> None:
        for name, term in terms.items():
            if term.weight == 0:  # logged only, as the config asks (task MoE's balance)
                continue
            seen = self.terms.setdefault(name, [])
            if not term.value.requires_grad:
                seen.append(0.0)  # no graph: no gradient can reach it
                continue
            term.value.register_hook(lambda grad, seen=seen: seen.append(grad.abs().item()))

    def check(self, features: list[str]) -> str:
        may_idle = self.may_idle + tuple(
            prefix for name in features for prefix in FEATURES[name].idle)
        idle = sorted(n for n in set(self.params) - self.learned if not n.startswith(may_idle))
        assert not idle, f"parameters that never got a gradient: {idle[:6]}"
        for name in features:
            for prefix in FEATURES[name].learns:
                assert any(n.startswith(prefix) for n in self.names), (
                    f"{FEATURES[name].label}: no parameter {prefix}*")
            for term in FEATURES[name].auxiliary:  # (a frozen encoder may leave one out)
                assert term in self.terms or self.frozen_encoder, (
                    f"{FEATURES[name].label}: auxiliary term {term} never computed")
        for term, grads in self.terms.items():
            assert all(g > 0 for g in grads), (
                f"auxiliary term {term} got no gradient from the final loss: {grads}")
        return f"{len(self.params)} parameters, {len(self.terms)} auxiliary terms"


class WatchedProxy:
    """The trainer's `TaskLoss` or `Regularizers`, calls watched (`GradientLog.watched`),
    every other attribute its own."""

    def __init__(self, watched, log: GradientLog, position: int | None):
        self._watched, self._call = watched, log.watched(watched, position)

    def __call__(self, *args):
        return self._call(*args)

    def __getattr__(self, name):
        return getattr(self._watched, name)


def train_checked(config, run_dir: Path, features: list[str]) -> str:
    """Train `config` for STEPS steps into `run_dir` (checkpoints every RESUME_FROM) and
    check its gradients; then resume a copy from step RESUME_FROM and check that it ends
    with the same checkpoint, bit for bit. Works in one process and under torchrun."""
    from mtbert.distributed import current_world, run_on_main
    from mtbert.training import Trainer

    trainer = Trainer(config, run_dir)
    log = GradientLog(trainer)
    trainer.fit()
    checked = log.check(features)
    leaves = [glob for name in features for glob in FEATURES[name].leaves]
    logs = [key for name in features for key in FEATURES[name].logs]
    copy = run_dir.with_name(run_dir.name + "-resumed")
    last = f"checkpoints/step-{STEPS:08d}"

    def copy_to_resume():
        shutil.copytree(run_dir, copy)
        shutil.rmtree(copy / last)
        for path in (p for glob in leaves for p in copy.glob(glob)):
            path.unlink()

    run_on_main(copy_to_resume)
    resumed = Trainer(config, copy)
    assert resumed.resume().name == f"step-{RESUME_FROM:08d}"
    resumed.fit()
    if current_world().is_main:
        same_checkpoint(run_dir / last, copy / last)
        for folder in (run_dir, copy):
            last_record = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
            assert all(key in last_record for key in logs), (folder, logs, list(last_record))
        for glob in leaves:
            written = sorted(p.relative_to(run_dir) for p in run_dir.glob(glob))
            assert written, f"{glob}: not written"
            for path in written:
                same_numbers(run_dir / path, copy / path)
    return f"{checked}; resumed at step {RESUME_FROM} bit-identically"


def same_numbers(one: Path, two: Path) -> None:
    """The same text, numbers equal to 1e-9 relative: under DDP a resumed run adds the
    ranks' sums in another order."""
    a, b = (p.read_text(encoding="utf-8").replace(",", " ").split() for p in (one, two))
    assert len(a) == len(b), f"{two.name}: another length after resuming"
    for x, y in zip(a, b):
        try:
            same = abs(float(x) - float(y)) <= 1e-9 * max(abs(float(x)), 1e-300)
        except ValueError:
            same = x == y
        assert same, f"{two.name} differs after resuming: {x} != {y}"


def same_checkpoint(one: Path, two: Path) -> None:
    """Every tensor of the two checkpoints equal, and the positions of data and schedule."""
    files = sorted(p.name for p in one.glob("*.safetensors"))
    assert files == sorted(p.name for p in two.glob("*.safetensors"))
    for name in files:
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resuming"
    a, b = (json.loads((p / "state.json").read_text()) for p in (one, two))
    for key in ("optimizer_steps", "scheduler", "streams", "combiner"):
        assert a[key] == b[key], key
    for key in ("step", "examples_seen", "affinity", "affinity_steps"):
        assert a["train_state"][key] == b["train_state"][key], key


# ---------------------------------------------------------------- the world of the matrix


class Setup:
    """The tiny backbone and data, a teacher file, and the runs cells share (made once)."""

    def __init__(self, backbone: Path, data: Path, work: Path):
        self.backbone, self.data, self.work = backbone, data, work
        self.teacher = work / "quora-teacher.jsonl"
        self.runs: dict[tuple, Path] = {}

    def write_teacher(self) -> None:
        """A teacher for every Quora training example, as `mtbert predict` writes one."""
        lines = self.data.joinpath("quora-train.csv").read_text(encoding="utf-8").splitlines()
        self.teacher.write_text("".join(json.dumps({"id": line.split("\t")[1], "probabilities": {
            "not duplicate": 0.3, "duplicate": 0.7}}) + "\n" for line in lines[1:]),
            encoding="utf-8")

    def config(self, techniques: tuple[str, ...], tasks: str = TASKS,
               overrides: tuple[str, ...] | None = None, head: tuple[str, ...] = ()):
        """The config of a run of `techniques` (their `overrides` unless given); a refusal
        naming them when it is read."""
        from mtbert.errors import ConfigError

        from conftest import tiny_config

        if overrides is None:
            overrides = [o.replace(TEACHER, str(self.teacher))
                         for name in techniques for o in FEATURES[name].overrides]
        siamese = SIAMESE if "quora" in tasks else []
        try:
            return tiny_config(self.backbone, self.data, *BASE, *siamese, *head, *overrides,
                               tasks=tasks)
        except ConfigError as error:
            if not techniques:
                raise
            raise refusal(error, *techniques) from None

    def run(self, techniques: tuple[str, ...] = ()) -> Path:
        """A checked, resumed run of `techniques` (cached), and its resumed copy beside it."""
        key = ("run", techniques)
        if key not in self.runs:
            folder = self.work / "-".join(("run", *techniques))
            train_checked(self.config(techniques), folder, list(techniques))
            self.runs[key] = folder
        return self.runs[key]

    def plain_run(self, model_overrides: tuple[str, ...], tasks: str) -> Path:
        """A run of one renamed SST task with `model_overrides` (the model settings a run
        added to or merged with must share), trained without checks."""
        from mtbert.training import Trainer

        key = ("plain", model_overrides, tasks)
        if key not in self.runs:
            folder = self.work / f"plain-{len(self.runs)}"
            Trainer(self.config((), tasks, model_overrides), folder).fit()
            self.runs[key] = folder
        return self.runs[key]

    def added_task_config(self, techniques: tuple[str, ...], pair: tuple[str, ...]):
        """`train --from` a run of SST with the techniques' model settings: Quora and STS
        added, training under the techniques' settings."""
        from mtbert.adapting import config_from_run
        from mtbert.errors import ConfigError
        from mtbert.techniques import check_techniques

        model = model_settings(techniques)
        old = self.plain_run(model, OLD_TASK)
        new = self.config(techniques, tasks="[quora, sts]", head=ADDED_HEAD)
        try:
            config = config_from_run(old, new)
            check_techniques(config)
        except ConfigError as error:
            raise refusal(error, *pair) from None
        return config

    def finetune_config(self, run: Path, techniques: tuple[str, ...], pair: tuple[str, ...]):
        """`train --from RUN --finetune quora` under the techniques' training settings."""
        from mtbert.adapting import config_from_run
        from mtbert.errors import ConfigError

        try:
            return config_from_run(run, self.config(techniques), FINETUNED)
        except ConfigError as error:
            raise refusal(error, *pair) from None


# ---------------------------------------------------------------- actions on a run


def merge(setup: Setup, run: Path, techniques: tuple[str, ...], pair: tuple[str, ...]
          ) -> Path:
    """`mtbert merge` of `run` and a run of another task with the same model settings; the
    merged model must predict every task."""
    from mtbert.errors import ConfigError
    from mtbert.merging import merge_runs

    model = model_settings(techniques)
    partner = setup.plain_run(model, PARTNER_TASK)
    out = run.with_name(run.name + "-merged")
    try:
        merge_runs([run, partner], "average", out, overwrite=True)
    except ConfigError as error:
        raise refusal(error, *pair) from None
    predicts_every_task(out)
    return out


def export(run: Path, pair: tuple[str, ...]) -> tuple[Path, str]:
    """`mtbert export` to hf and onnx; each format as a whole model, else per task
    (`--task`, where the model has one plain-BERT path per task), else a refusal. The hf
    folder must predict like the run, and the ONNX graphs like PyTorch."""
    import mtbert
    from mtbert.export import ExportError
    from mtbert.export import export as export_folder

    said, refused, hf = [], [], None
    first = next(iter(mtbert.load(run).tasks))
    for fmt in ("hf", "onnx"):
        out, errors = run.with_name(f"{run.name}-{fmt}"), []
        for task in (None, first):
            try:
                exported = export_folder(run, out, fmt, task=task, overwrite=True)
            except ExportError as error:
                errors.append(error)
                continue
            assert all(d < 1e-4 for d in exported.differences.values()), exported.differences
            said.append(fmt if task is None else f"{fmt} --task {task}")
            if fmt == "hf":
                hf = out
                same_predictions(run, out, [task] if task else None)
            break
        else:  # the first error says why the whole model cannot go
            refused.append((fmt, str(refusal(errors[0], *pair))))
    if refused:
        formats = ", ".join(fmt for fmt, _ in refused)
        reasons = "; ".join(dict.fromkeys(message for _, message in refused))
        raise Refused(f"{formats}: {reasons}" + (f" ({', '.join(said)} works)" if said else ""))
    return hf, ", ".join(said)


def serve(folder: Path) -> None:
    """The model served: healthy, every task predicted, sentences embedded."""
    from fastapi.testclient import TestClient

    import mtbert
    from mtbert.serving.app import create_app

    model = mtbert.load(folder)
    with TestClient(create_app(model)) as client:
        assert client.get("/health").status_code == 200
        for task, inputs in example_inputs(model).items():
            response = client.post("/v1/predict", json={"task": task, "inputs": inputs})
            assert response.status_code == 200, response.text
            assert len(response.json()["predictions"]) == len(inputs)
        response = client.post("/v1/embed", json={"inputs": ["good film", "bad plot"]})
        assert response.status_code == 200, response.text


def example_inputs(model) -> dict[str, list]:
    return {info.name: [["good film", "bad plot"], ["cat runs", "dog runs"]] if info.pair
            else ["good film", "awful story"] for info in model.tasks.values()}


def predicts_every_task(folder: Path) -> None:
    import mtbert

    model = mtbert.load(folder)
    for task, inputs in example_inputs(model).items():
        assert len(model.predict(task, inputs)) == len(inputs)


def same_predictions(run: Path, exported: Path, tasks: list[str] | None) -> None:
    import mtbert

    original, copy = mtbert.load(run), mtbert.load(exported)
    for task, inputs in example_inputs(copy).items():
        if tasks is None or task in tasks:
            for a, b in zip(original.predict(task, inputs), copy.predict(task, inputs)):
                assert a.label == b.label or abs(a.label - b.label) < 1e-4, (task, a, b)


def act(setup: Setup, action: str, run: Path, techniques: tuple[str, ...],
        pair: tuple[str, ...]) -> tuple[Path, str]:
    """Do `action` on `run` (a run of `techniques`); returns what the next action of a
    chain acts on, and what was checked. A refusal must name both features of `pair`."""
    if action == "resume":  # train_checked resumed it: act on the resumed copy
        return run.with_name(run.name + "-resumed"), f"{run.name}: resumed bit-identically"
    if action == "add_task":
        folder = run.with_name(run.name + "-added")
        if ("added", folder) not in setup.runs:  # one added run for every chain from `run`
            setup.runs[("added", folder)] = train_checked(
                setup.added_task_config(techniques, pair), folder, list(techniques))
        return folder, f"Quora and STS added to a run: {setup.runs[('added', folder)]}"
    if action == "finetune":
        folder = run.with_name(run.name + "-finetuned")
        if ("finetuned", folder) not in setup.runs:
            setup.runs[("finetuned", folder)] = train_checked(
                setup.finetune_config(run, techniques, pair), folder, list(techniques))
        return folder, f"{FINETUNED} fine-tuned alone: {setup.runs[('finetuned', folder)]}"
    if action == "merge":
        return merge(setup, run, techniques, pair), "merged with a run of another task; predicts"
    if action == "export":
        folder, formats = export(run, pair)
        return folder, f"exported: {formats}"
    serve(run)
    return run, "served: /health, /v1/predict for every task, /v1/embed"


# ---------------------------------------------------------------- the table


def table(outcomes: dict[tuple[str, str], Outcome]) -> str:
    """The matrix as markdown: one row per feature, the upper triangle filled."""
    names = list(FEATURES)
    refused = [(pair, o.refused) for pair, o in outcomes.items() if o.refused]
    numbers = {pair: i + 1 for i, (pair, _) in enumerate(refused)}
    lines = ["| | " + " | ".join(FEATURES[n].short for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for i, a in enumerate(names):
        cells = []
        for j, b in enumerate(names):
            if j <= i:
                cells.append("")
            elif one_key(a, b):
                cells.append("=")
            elif (a, b) in numbers:
                cells.append(f"no{numbers[(a, b)]}")
            else:
                cells.append("ok")
        lines.append(f"| {FEATURES[a].short} {FEATURES[a].label} | " + " | ".join(cells) + " |")
    works = sum(1 for o in outcomes.values() if o.checked and not o.refused)
    same = sum(1 for a, b in PAIRS if one_key(a, b))
    lines += ["", f"{len(PAIRS)} pairs: {works} work, {len(refused)} are refused, {same} are "
              "one setting (`=`: the two are values of one key).", ""]
    lines += [f"- no{numbers[pair]}: {FEATURES[pair[0]].label} + {FEATURES[pair[1]].label}: "
              f"{message}" for pair, message in refused]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + section + "\n" + text[end:]


if __name__ == "__main__":
    import os

    import pytest

    os.environ["MTBERT_WRITE_MATRIX"] = "1"
    sys.exit(pytest.main([str(TESTS / "test_composition.py"), "-q", "-p", "no:cacheprovider",
                          *sys.argv[1:]]))
