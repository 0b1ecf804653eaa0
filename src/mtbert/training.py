"""The multitask training loop, top to bottom: setup, steps, evaluation, checkpoints.

Every technique enters through its interface: the sampler says which tasks a step draws,
each task's stream gives a batch, the model and the task's loss give a loss and auxiliary
terms, distillation mixes in the teacher's loss, the weighting turns losses into terms, the
combiner turns terms and the auxiliary terms into gradients. Nothing here branches on a
method's name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mtbert.adapting import adapt_model
from mtbert.auxiliary import total as auxiliary_total
from mtbert.balancing import TaskContext, build_combiner, build_weighting
from mtbert.checkpoint import (
    LOCK_FILE,
    CorruptCheckpointError,
    RunFolderError,
    RunLock,
    claim_output,
    drop_replaced_run,
    holds_run,
    load_json,
    load_tensors,
    recover_interrupted_writes,
    save_json,
    save_tensors,
    set_run_aside,
    verify_checkpoint,
    write_checkpoint,
)
from mtbert.config import (
    ConfigError,
    ExperimentConfig,
    TaskConfig,
    config_differences,
    dump_config,
    to_dict,
)
from mtbert.data.batching import Batch, EncodedSplit, TaskStream
from mtbert.data.sampling import build_sampler, optimizer_steps
from mtbert.data.tasks import EVAL_SAMPLE_SEED, load_split, subsample_split
from mtbert.data_maps import FOLDER as DATA_MAPS_FOLDER
from mtbert.data_maps import DataMaps
from mtbert.distillation import build_distillation
from mtbert.distributed import (
    average_gradients,
    current_world,
    gather_objects,
    gather_shards,
    gradient_sync,
    mean_across_ranks,
    reduce_values,
    run_on_main,
    shard_rows,
    step_forward,
)
from mtbert.evaluation import evaluate_splits, overall_score, predict, task_scores
from mtbert.lookahead import add_affinity, lookahead_affinity, mean_affinity, mean_over_ranks
from mtbert.losses.task import TaskLoss
from mtbert.model.bert import BertModel
from mtbert.model.heads import is_siamese
from mtbert.model.loading import load_bert
from mtbert.model.multitask import MultitaskModel
from mtbert.model_folder import build_model, load_model, save_model
from mtbert.optim import AdamW, warmup_linear_decay
from mtbert.precision import autocast, resolve_precision
from mtbert.provenance import code_version
from mtbert.regularizers import Regularizers
from mtbert.techniques import check_techniques
from mtbert.tokenizer import Tokenizer
from mtbert.weight_averaging import build_weight_average

log = logging.getLogger(__name__)


# What `mtbert train --resume RUN KEY=VALUE` may change: a run that stopped on NaN losses
# goes on from its last good checkpoint with a smaller learning rate.
RESUME_OVERRIDES = ("train.lr", "train.head_lr", "train.weighting_lr", "train.max_bad_steps",
                    "distributed.timeout_s")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN); the last good checkpoint is kept."""


# ---------------------------------------------------------------- model and data


def load_backbone(config: ExperimentConfig) -> tuple[BertModel, Tokenizer]:
    encoder, folder = load_bert(config.model.backbone)
    if config.model.max_length > encoder.config.max_position_embeddings:
        raise ConfigError(f"model.max_length: {config.model.max_length} is more than the "
                          f"backbone's {encoder.config.max_position_embeddings} positions")
    if config.model.hidden_dropout is not None or config.model.attention_dropout is not None:
        encoder = _with_dropout(encoder, config)
    return encoder, Tokenizer.from_folder(folder, config.model.max_length)


def _with_dropout(encoder: BertModel, config: ExperimentConfig) -> BertModel:
    bert_config = encoder.config
    if config.model.hidden_dropout is not None:
        bert_config.hidden_dropout_prob = config.model.hidden_dropout
    if config.model.attention_dropout is not None:
        bert_config.attention_probs_dropout_prob = config.model.attention_dropout
    rebuilt = BertModel(bert_config)
    rebuilt.load_state_dict(encoder.state_dict())
    return rebuilt


@dataclass
class TaskData:
    config: TaskConfig
    train: EncodedSplit
    dev: EncodedSplit | None  # what evaluation scores: at most `train.max_eval_examples`
    dev_total: int = 0  # examples in the whole dev file


def load_task_data(config: ExperimentConfig, tokenizer: Tokenizer) -> dict[str, TaskData]:
    """Every task's train and dev splits, tokenized once into the token cache and mapped
    from it (each run, seed and process reuses the cache)."""
    data = {}
    for task in config.tasks:
        train, dev = (load_split(task, split, config, tokenizer, is_siamese(task))
                      for split in ("train", "dev"))
        train = subsample_split(train, config.train.max_train_examples,
                                config.train.train_fraction, config.train.seed)
        dev_total = 0 if dev is None else len(dev)
        dev = subsample_split(dev, config.train.max_eval_examples, seed=EVAL_SAMPLE_SEED)
        data[task.name] = TaskData(task, train, dev, dev_total)
        log.info("%s: %d train, %d dev examples", task.name, len(train),
                 0 if dev is None else len(dev))
    return data


# ---------------------------------------------------------------- the trainer


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    bad_steps: int = 0  # NaN/inf steps in a row
    skipped_steps: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    best_record: int = -1  # index into history
    task_best: dict[str, float] = field(default_factory=dict)  # adapt.keep_task_best
    history: list[dict] = field(default_factory=list)
    examples_seen: dict[str, int] = field(default_factory=dict)  # training examples per task
    first_losses: list[dict] = field(default_factory=list)  # per-step losses, first steps
    affinity: dict[str, dict[str, float]] = field(default_factory=dict)  # sums of Z (TAG)
    affinity_steps: int = 0  # look-ahead measurements summed in `affinity`


FIRST_LOSSES_STEPS = 20  # how many steps `TrainState.first_losses` keeps (no-op detection)


class Trainer:
    """Owns everything one run needs; `fit()` trains, evaluates and checkpoints.

    In a torchrun job (a process group is set up) it is one rank of the job: batch sizes are
    per rank, the model trains under DDP, and only rank 0 writes into `run_dir`.
    """

    def __init__(self, config: ExperimentConfig, run_dir: str | Path):
        check_techniques(config)  # before any data is read
        self.config, self.run_dir = config, Path(run_dir)
        self.world = current_world()
        train = config.train
        torch.manual_seed(train.seed)
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if train.device == "auto"
            else train.device)
        if self.device.type == "cuda" and self.world.active:
            self.device = torch.device("cuda", self.world.local_rank)
        self.precision = resolve_precision(train.precision, self.device)
        log.info("precision: %s (train.precision: %s, device %s)", self.precision,
                 train.precision, self.device)
        encoder, self.tokenizer = load_backbone(config)
        self.data = load_task_data(config, self.tokenizer)
        self.model = build_model(config, encoder).to(self.device)
        frozen = adapt_model(self.model, config.adapt)  # tasks loaded from adapt.from_run
        trained = {name: d for name, d in self.data.items() if name not in frozen}
        self.forward = step_forward(self.model, self.device)  # after freezing: DDP's buckets
        if self.world.active:  # the same model everywhere, but each rank its own dropout
            torch.manual_seed(train.seed + self.world.rank)
        self.losses = {name: TaskLoss(t.config) for name, t in trained.items()}
        self.data_maps = DataMaps({n: d.config for n, d in trained.items()},
                                  {n: len(d.train) for n, d in trained.items()}
                                  ) if train.data_maps else None
        self.distillation = build_distillation(
            config.distill, {n: d.config for n, d in trained.items()},
            {n: d.train for n, d in trained.items()}, self.tokenizer, train.eval_batch_size)
        names = list(trained)
        self.streams = {
            name: TaskStream(name, d.train, d.config.batch_size or train.batch_size,
                             train.seed, self.tokenizer.pad_id, self.world.rank, self.world.size)
            for name, d in trained.items()}
        self.sampler = build_sampler(
            train.sampler, {n: len(d.train) for n, d in trained.items()},
            {n: s.global_batch_size for n, s in self.streams.items()}, train.seed,
            epochs=train.epochs, **train.sampler_options)
        self.total_steps = optimizer_steps(self.sampler, train.epochs, train.grad_accumulation,
                                           train.max_steps)
        self.sampler.fit_schedule(self.total_steps * train.grad_accumulation)
        context = TaskContext(tuple(names), {n: d.config.kind for n, d in trained.items()},
                              {n: d.config.weight for n, d in trained.items()}, train.seed)
        self.weighting = build_weighting(train.weighting, context, **train.weighting_options)
        self.combiner = build_combiner(train.combiner, context)
        self.optimizer = self._build_optimizer()
        self.regularizers = Regularizers(train.regularizers, self.model)
        self.averaging = build_weight_average(train.weight_average, self.model,
                                              self.total_steps)
        self.configured_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scheduler = warmup_linear_decay(
            self.optimizer, int(train.warmup_ratio * self.total_steps), self.total_steps)
        self.state = TrainState()
        self.metrics_file = self.run_dir / "metrics.jsonl"

    def _build_optimizer(self) -> AdamW:
        """Decay on weight matrices only; heads may have their own learning rate; the
        weighting's learned parameters get a group of their own, without decay."""
        train = self.config.train
        shared = {id(p) for p in self.model.shared_parameters()}
        groups = {"shared_decay": [], "shared_no_decay": [], "task_decay": [],
                  "task_no_decay": []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            scope = "shared" if id(p) in shared else "task"
            decay = p.dim() >= 2 and "norm" not in name
            groups[f"{scope}_{'decay' if decay else 'no_decay'}"].append(p)
        head_lr = train.head_lr or train.lr
        param_groups = [
            dict(params=groups["shared_decay"], weight_decay=train.weight_decay),
            dict(params=groups["shared_no_decay"], weight_decay=0.0),
            dict(params=groups["task_decay"], weight_decay=train.weight_decay, lr=head_lr),
            dict(params=groups["task_no_decay"], weight_decay=0.0, lr=head_lr),
            dict(params=list(self.weighting.parameters()), weight_decay=0.0,
                 lr=train.weighting_lr),
        ]
        return AdamW([g for g in param_groups if g["params"]], lr=train.lr)

    # ------------------------------------------------------------ one step

    @property
    def epoch(self) -> int:
        """The 0-based schedule epoch (`TaskSampler.fit_schedule`: shorter epochs when a step
        cap stops the run early) that DWA and MNRL's threshold follow."""
        return self.sampler.epoch_of(self.state.step * self.config.train.grad_accumulation)

    def train_step(self) -> dict:
        """One optimizer step over `grad_accumulation` micro-steps; returns logged values
        (under DDP: means over the ranks, tokens and examples summed)."""
        train = self.config.train
        model = self.model.train()
        shared, other = model.shared_parameters(), model.task_parameters()
        other = other + list(self.weighting.parameters())
        # DDP averages the gradients in the last micro-step's backward pass, unless the
        # combiner averages per-task gradients itself.
        ddp_averages = not self.combiner.averages_across_ranks
        logged: dict[str, float] = {}
        counts = {"tokens": 0}
        backward_loss = 0.0  # what the technique changes: the loss actually back-propagated
        for micro in range(train.grad_accumulation):
            micro_step = self.state.step * train.grad_accumulation + micro
            batches: dict[str, Batch] = {
                task: self.streams[task].next().to(self.device)
                for task in self.sampler.tasks_for_step(micro_step)}
            last = micro == train.grad_accumulation - 1
            if micro == 0 and train.affinity_every and self.state.step % train.affinity_every == 0:
                self._measure_affinity(batches)
            with gradient_sync(self.forward, ddp_averages and last):
                with autocast(self.device, self.precision):
                    outputs = self.forward(batches)
                losses, auxiliary = {}, []
                for task, batch in batches.items():
                    counts["tokens"] += batch.real_tokens()
                    counts[f"{task}/examples"] = counts.get(f"{task}/examples", 0) + len(batch)
                    loss, extra, parts = self.losses[task](outputs[task], batch.labels,
                                                           self.epoch)
                    loss, taught = self.distillation(task, outputs[task].predictions, loss,
                                                     batch.rows, self.state.step / self.total_steps)
                    parts.update(taught)
                    losses[task] = loss
                    auxiliary += extra.values()
                    if self.data_maps is not None:
                        self.data_maps.record(task, outputs[task].predictions, batch.labels,
                                              batch.rows)
                    logged.update({f"{task}/{k}": v for k, v in parts.items()})
                with autocast(self.device, self.precision):
                    regularized = {task: self.regularizers(model, self.data[task].config, batch,
                                                           outputs[task])
                                   for task, batch in batches.items()}
                for task, named in regularized.items():
                    logged.update({f"{task}/{name}": term.value.item()
                                   for name, term in named.items()})
                    auxiliary += named.values()
                # Distillation and the weighting see the tasks' own losses; the auxiliary
                # terms (MNRL, MoE balance, regularisers such as SMART) join after them, each
                # under its own weight (`mtbert.auxiliary`). The micro-step's share of the
                # optimizer step scales both, regularisers (uncertainty's s/2) included.
                terms = self.weighting(losses, model.last_shared_parameters())
                extra_total = auxiliary_total(auxiliary)
                backward = sum(terms.values()) + (0.0 if extra_total is None else extra_total)
                backward_loss += backward.item() / train.grad_accumulation
                self.combiner.backward(
                    {t: term / train.grad_accumulation for t, term in terms.items()}, shared,
                    other, auxiliary=None if extra_total is None
                    else extra_total / train.grad_accumulation)
        logged["backward_loss"] = backward_loss
        average_gradients(list(self.weighting.parameters())
                          + ([] if ddp_averages else model.task_parameters()))
        logged = reduce_values(logged)  # every rank logs, and skips, the same
        counts = reduce_values(counts, op="sum")
        tokens = int(counts.pop("tokens"))
        for key, count in counts.items():
            task = key.removesuffix("/examples")
            self.state.examples_seen[task] = self.state.examples_seen.get(task, 0) + int(count)
        # One pass over the gradients gives both the clipping norm and the NaN/inf check.
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), train.grad_clip or math.inf, foreach=True)
        logged["grad_norm"] = grad_norm.item()
        if not all(math.isfinite(v) for v in logged.values()):
            self._skip_bad_step()
        else:
            self.state.bad_steps = 0
            self.optimizer.step()
            self.weighting.after_optimizer_step()
            self.regularizers.after_optimizer_step(model)
            if self.averaging is not None:
                self.averaging.after_optimizer_step(model, self.state.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if len(self.state.first_losses) < FIRST_LOSSES_STEPS:
            self.state.first_losses.append({k: v for k, v in logged.items()
                                            if k.endswith("loss")})
        self.state.step += 1
        logged["tokens"] = tokens
        return logged

    def _measure_affinity(self, batches: dict[str, Batch]) -> None:
        """TAG's look-ahead affinity on this step's batches (lookahead.py), summed."""
        measured = lookahead_affinity(
            self.model, batches,
            lambda task, output, batch: self.losses[task].task_loss(output, batch.labels),
            self.config.train.lr)
        add_affinity(self.state.affinity, mean_over_ranks(measured))
        self.state.affinity_steps += 1

    def _skip_bad_step(self) -> None:
        self.weighting.after_skipped_step()
        self.state.bad_steps += 1
        self.state.skipped_steps += 1
        log.warning("step %d: loss or gradient is NaN/inf; step skipped (%d in a row)",
                    self.state.step, self.state.bad_steps)
        if self.state.bad_steps >= self.config.train.max_bad_steps:
            raise TrainingError(
                f"{self.state.bad_steps} steps in a row had NaN/inf losses or gradients; "
                f"training stopped. The checkpoints in {self.checkpoints_dir} are from good "
                f"steps; go on from the newest with a smaller learning rate: mtbert train "
                f"--resume {self.run_dir} train.lr={self.config.train.lr / 2:g}")

    # ------------------------------------------------------------ evaluation

    def evaluate(self, split: str = "dev") -> dict[str, float]:
        """Scores on `split`; under DDP each rank predicts every world-size-th example and
        every rank gets all predictions, hence the same scores."""
        scores = {}
        for name, data in self.data.items():
            encoded = data.dev if split == "dev" else data.train
            if encoded is None or encoded.labels is None:
                continue
            shard = encoded.subset(shard_rows(len(encoded))) if self.world.active else encoded
            predictions = predict(self.model, name, shard,
                                  self.config.train.eval_batch_size, self.tokenizer.pad_id)
            predictions = gather_shards(predictions, len(encoded))
            scores.update(task_scores(data.config, predictions, encoded.labels.numpy()))
        scores["overall"] = overall_score(self.model.tasks, scores, self.config.overall_score)
        return scores

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train to the end, evaluating `evals_per_epoch` times per epoch; returns the best
        dev scores. The best model is kept in `RUN_DIR/best`."""
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.run_dir, self.checkpoints_dir):
                recover_interrupted_writes(folder)
            dump_config(self.config, self.run_dir / "config.yaml")
            log.info("parameters: %s; %d process(es)", self.parameter_counts(), self.world.size)
            save_json(self.run_dir / "run.json", {"parameters": self.parameter_counts(),
                                                 "total_steps": self.total_steps,
                                                 "world_size": self.world.size,
                                                 "precision": self.precision,
                                                 "code": code_version()})
        epoch_steps = max(1, self.sampler.steps_per_epoch() // self.config.train.grad_accumulation)
        eval_every = max(1, epoch_steps // self.config.train.evals_per_epoch)
        start = time.perf_counter()
        running: dict[str, float] = {}
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train",
                   dynamic_ncols=True, disable=not self.world.is_main)
        try:  # the bar ends its line even when training stops with an error
            while self.state.step < self.total_steps:
                epoch_before = self.epoch
                logged = self.train_step()
                for key, value in logged.items():
                    running[key] = 0.9 * running.get(key, value) + 0.1 * value
                bar.update(1)
                bar.set_postfix({k.replace("/loss", ""): f"{v:.3f}" for k, v in running.items()
                                 if k.endswith("/loss")})
                if self.epoch != epoch_before:
                    self.weighting.on_epoch_end()
                finished = self.state.step == self.total_steps
                evaluate = self.state.step % eval_every == 0 or finished
                # While steps are being skipped nothing is written: the checkpoints and best/ on
                # disk stay those of the last good step, which is where --resume starts.
                if self.state.bad_steps:
                    continue
                if evaluate:
                    with self.evaluated_weights():
                        self._evaluate_and_keep_best(running, time.perf_counter() - start)
                if evaluate or self.state.step % self.config.train.checkpoint_every == 0:
                    self.save_training_state()
        finally:
            bar.close()
        if self.data_maps is not None:
            self._write_data_maps()
        no_dev = self.state.best_record < 0 and not any(d.dev for d in self.data.values())
        if no_dev and self.world.is_main:
            log.info("no task has dev data: best/ is the model of the last step")
            with self.evaluated_weights():
                save_model(self.run_dir / "best", self.model, self.tokenizer, self.config,
                           {"dev": {}, "step": self.state.step})
        return self.state.history[self.state.best_record]["dev"] if self.state.history else {}

    def evaluated_weights(self) -> contextlib.AbstractContextManager:
        """The model holds the weights that are evaluated and kept inside the block: the
        `train.weight_average`, if any, else the raw weights."""
        if self.averaging is None:
            return contextlib.nullcontext()
        return self.averaging.average.swapped_in(self.model)

    def _evaluate_and_keep_best(self, running: dict[str, float], elapsed: float) -> None:
        scores = self.evaluate("dev")
        record = {"step": self.state.step, "epoch": self.state.step / max(
            1, self.sampler.steps_per_epoch() / self.config.train.grad_accumulation),
            "elapsed_s": round(elapsed, 1), "train": dict(running), "dev": scores,
            "weights": self.weighting.weights(), "lr": self.optimizer.param_groups[0]["lr"],
            "skipped_steps": self.state.skipped_steps}
        if self.state.affinity_steps:
            record["affinity"] = mean_affinity(self.state.affinity, self.state.affinity_steps)
        self.state.history.append(record)
        if self.world.is_main:
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            log.info("step %d dev %s", self.state.step,
                     {k: round(v, 4) for k, v in scores.items()})
        # Every rank has the same scores, hence the same state; rank 0 writes best/.
        if math.isfinite(scores["overall"]) and scores["overall"] > self.state.best_score:
            self.state.best_score = scores["overall"]
            self.state.best_step = self.state.step
            self.state.best_record = len(self.state.history) - 1
            if self.world.is_main:
                save_model(self.run_dir / "best", self.model, self.tokenizer, self.config,
                           self._best_metrics(scores))
        if self.config.adapt.keep_task_best:
            self._keep_task_best(scores)

    def _write_data_maps(self) -> None:
        """`RUN_DIR/data_maps/TASK.csv`, of every rank's examples."""
        self.data_maps.load_state_dict(self._data_maps_of_every_rank())
        if self.world.is_main:
            self.data_maps.write(self.run_dir / DATA_MAPS_FOLDER)

    def _data_maps_of_every_rank(self) -> dict[str, Tensor]:
        """The data maps' sums over the examples of every rank (under DDP each records its
        own); a collective, every rank calls it."""
        state = self.data_maps.state_dict()
        if self.world.active:
            state = {key: mean_across_ranks(value) * self.world.size
                     for key, value in state.items()}
        return state

    def _keep_task_best(self, scores: dict[str, float]) -> None:
        """`best-tasks/TASK/`: the model at the task's own best dev score, which may come at
        another step than the overall best (a student can be assembled from them)."""
        for task, score in scores.items():
            if task not in self.model.tasks or not score > self.state.task_best.get(
                    task, -math.inf):  # "overall", "mrpc/f1": not task scores
                continue
            self.state.task_best[task] = score
            if self.world.is_main:
                save_model(self.run_dir / "best-tasks" / task, self.model, self.tokenizer,
                           self.config, self._best_metrics(scores) | {"task": task})

    def _best_metrics(self, scores: dict[str, float]) -> dict:
        """A saved model's `metrics.json`: its dev scores, its step, and how many dev
        examples of how many the scores are of (a sample when `train.max_eval_examples`)."""
        return {"dev": scores, "step": self.state.step, "dev_examples": {
            name: {"scored": len(d.dev), "of": d.dev_total}
            for name, d in self.data.items() if d.dev is not None}}

    # ------------------------------------------------------------ resume checkpoints

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_training_state(self) -> Path | None:
        """Everything that decides the rest of the run, so that a resumed run ends with the
        same weights as an uninterrupted one: model, optimizer, schedule, data positions,
        balancing state, RNG state. Every rank calls it (each sends its RNG state); rank 0
        writes it, and returns the folder (the others None)."""
        rng = gather_objects(rng_states())
        data_maps = None if self.data_maps is None else self._data_maps_of_every_rank()
        if not self.world.is_main:
            return None
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        optimizer_tensors, steps = {}, {}
        for index, p in enumerate(params):
            state = self.optimizer.state.get(p)
            if state:
                optimizer_tensors[f"{index}.exp_avg"] = state["exp_avg"]
                optimizer_tensors[f"{index}.exp_avg_sq"] = state["exp_avg_sq"]
                steps[index] = state["step"]

        def write(tmp: Path) -> None:
            save_tensors(tmp / "model.safetensors", self.model.state_dict())
            save_tensors(tmp / "optimizer.safetensors", optimizer_tensors)
            save_tensors(tmp / "weighting.safetensors", self.weighting.state_dict())
            if data_maps is not None:
                save_tensors(tmp / "data_maps.safetensors", data_maps)
            if self.regularizers.parts:
                save_tensors(tmp / "regularizers.safetensors", self.regularizers.state_dict())
            if self.averaging is not None:
                save_tensors(tmp / "weight_average.safetensors",
                             self.averaging.average.state_dict())
            for rank, states in enumerate(rng):
                save_tensors(tmp / rng_file(rank), states)
            save_json(tmp / "state.json", {
                "world_size": self.world.size,
                "train_state": asdict(self.state),
                "optimizer_steps": steps,
                "scheduler": self.scheduler.state_dict(),
                "streams": {name: s.state_dict() for name, s in self.streams.items()},
                "combiner": self.combiner.state_dict(),
                "config": to_dict(self.config),
            })

        folder = write_checkpoint(self.checkpoints_dir / f"step-{self.state.step:08d}", write)
        keep = self.config.train.keep_checkpoints
        for old in sorted(self.checkpoints_dir.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def resume(self) -> Path:
        """Restore the newest checkpoint that passes its checksums (older ones are the
        fallback when the newest is truncated or corrupt); returns its folder. Rank 0
        chooses it; under DDP every rank then reads it (the run folder must be on a
        filesystem every machine sees)."""
        folder = run_on_main(self._newest_usable_checkpoint)
        self._load_training_state(folder)
        log.info("resumed from %s (step %d)", folder, self.state.step)
        return folder

    def _newest_usable_checkpoint(self) -> Path:
        recover_interrupted_writes(self.checkpoints_dir)
        for folder in sorted(self.checkpoints_dir.glob("step-*"), reverse=True):
            try:
                verify_checkpoint(folder, ["state.json", "model.safetensors",
                                           *map(rng_file, range(self.world.size))])
                self._check_same_run(load_json(folder / "state.json"), folder)
            except CorruptCheckpointError as error:
                log.warning("cannot resume from %s: %s; trying an older checkpoint", folder,
                            error)
                continue
            return folder
        raise TrainingError(f"no usable checkpoint under {self.checkpoints_dir}")

    def _check_same_run(self, meta: dict, folder: Path) -> None:
        """A checkpoint resumes only the run it was saved by: the config may differ only in
        `RESUME_OVERRIDES` (and where the data lives)."""
        saved = meta.get("config")
        if not isinstance(saved, dict):
            raise CorruptCheckpointError(f"{folder}/state.json does not record its config")
        changed = config_differences(saved, to_dict(self.config),
                                     (*RESUME_OVERRIDES, "data_dir", "distributed"))
        if changed:
            raise TrainingError(f"{folder} was trained with another config than "
                                f"{self.run_dir / 'config.yaml'} ({'; '.join(changed[:3])}); "
                                "start a new run with --overwrite or another --run-dir")
        # The global batch, hence the data order, depends on the number of processes.
        saved_world = meta.get("world_size", 1)
        if saved_world != self.world.size:
            raise TrainingError(f"{folder} was trained on {saved_world} process(es), this job "
                                f"has {self.world.size}; resume it with torchrun "
                                f"--nproc-per-node (and --nnodes) giving {saved_world} in all")

    def _load_training_state(self, folder: Path) -> None:
        meta = load_json(folder / "state.json")
        self.model.load_state_dict(load_tensors(folder / "model.safetensors"))
        optimizer_tensors = load_tensors(folder / "optimizer.safetensors")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer.state.clear()
        for index, step in meta["optimizer_steps"].items():
            p = params[int(index)]
            self.optimizer.state[p] = {
                "step": step, "exp_avg": optimizer_tensors[f"{index}.exp_avg"].to(p.device),
                "exp_avg_sq": optimizer_tensors[f"{index}.exp_avg_sq"].to(p.device)}
        self.scheduler.load_state_dict(meta["scheduler"])
        # The schedule continues from the configured learning rates, which --resume may
        # have lowered; unchanged, this recomputes the saved rates exactly.
        self.scheduler.base_lrs = list(self.configured_lrs)
        for group, base, factor in zip(self.optimizer.param_groups, self.configured_lrs,
                                       self.scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.weighting.load_state_dict(load_tensors(folder / "weighting.safetensors"))
        if self.data_maps is not None:  # every rank's sums: rank 0 carries them on
            sums = load_tensors(folder / "data_maps.safetensors")
            self.data_maps.load_state_dict(sums if self.world.is_main else
                                           {k: torch.zeros_like(v) for k, v in sums.items()})
        if self.regularizers.parts:
            self.regularizers.load_state_dict(load_tensors(folder / "regularizers.safetensors"))
        if self.averaging is not None:
            self.averaging.average.load_state_dict(
                load_tensors(folder / "weight_average.safetensors"))
        self.combiner.load_state_dict(meta["combiner"])
        for name, position in meta["streams"].items():
            self.streams[name].load_state_dict(position)
        set_rng_states(load_tensors(folder / rng_file(self.world.rank)))
        self.state = TrainState(**meta["train_state"])
        if self.world.is_main:
            with open(self.metrics_file, "w", encoding="utf-8") as f:  # drop later records
                f.writelines(json.dumps(record) + "\n" for record in self.state.history)

    def parameter_counts(self) -> dict[str, int]:
        def count(params):
            return (sum(p.numel() for p in params))
        conditioning = self.model.conditioning
        return {"encoder": count(self.model.encoder.parameters()),
                "heads": count(self.model.heads.parameters()),
                "conditioning": count(conditioning.parameters()) if conditioning else 0,
                "task_specific": count(self.model.task_parameters()),
                "total": count(self.model.parameters())}


def rng_file(rank: int) -> str:
    """A rank's RNG state in a checkpoint (rank 0's keeps the single-process name)."""
    return "rng.safetensors" if rank == 0 else f"rng-rank{rank}.safetensors"


def rng_states() -> dict[str, Tensor]:
    """The CPU generator's state, and each CUDA device's when there are any."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_states(states: dict[str, Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def train_and_evaluate(config: ExperimentConfig, run_dir: str | Path, resume: bool = False,
                       splits: tuple[str, ...] = ("dev", "test"), limit: int | None = None,
                       overwrite: bool = False
                       ) -> tuple[dict[str, dict[str, float]], float, MultitaskModel]:
    """What `mtbert train` does: train (or resume) a run, then score its best model on whole
    splits (or their first `limit` examples) and write `{task}-{split}-output.csv` under
    `run_dir/predictions`.

    The run folder is locked for the whole call (`RunLock`). A new run refuses a folder that
    is not empty, unless `overwrite` (which sets a run it holds aside, in `.replaced-run`,
    until the new run is complete), and always one that
    is or holds what the config reads (`checkpoint.claim_output`).
    Under DDP every rank trains; rank 0 alone holds the lock, scores the best model and
    writes the predictions (the other ranks return an empty table and their model).
    Returns ({split: {task: metric, "overall": score}}, training seconds, the best model).
    """
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as stack:
        run_on_main(lambda: _claim_run_folder(stack, run_dir, config, resume, overwrite))
        start = time.perf_counter()
        trainer = Trainer(config, run_dir)
        if resume:
            trainer.resume()
        trainer.fit()
        seconds = time.perf_counter() - start
        if not trainer.world.is_main:
            return {}, seconds, trainer.model
        model, tokenizer, config = load_model(run_dir)
        table = evaluate_splits(model, tokenizer, config, splits, run_dir / "predictions",
                                limit=limit)
        drop_replaced_run(run_dir)
    return table, seconds, model


def _claim_run_folder(stack: contextlib.ExitStack, run_dir: Path, config: ExperimentConfig,
                      resume: bool, overwrite: bool) -> None:
    """Lock `run_dir` until `stack` closes; a new run needs it empty or `overwrite`, and
    never one that is or holds an input of `config`."""
    if not resume:  # before the lock leaves a file; one holding a run gets --resume offered
        claim_output(run_dir, config.input_paths(), overwrite or bool(holds_run(run_dir)),
                     ignore=[LOCK_FILE])
    stack.enter_context(RunLock(run_dir))
    found = holds_run(run_dir)
    if found and not resume:
        if not overwrite:
            raise RunFolderError(
                f"{run_dir} holds another run ({', '.join(found)}); continue it with "
                f"--resume {run_dir}, replace it with --overwrite, or choose another "
                "--run-dir")
        aside = set_run_aside(run_dir)
        log.info("--overwrite: the run in %s is kept in %s until the new run completes",
                 run_dir, aside)
