"""Model merging: runs fine-tuned apart from the same backbone become one multitask model.

Each run's task vector is tau_i = theta_i - theta_0 (theta_0: the backbone). Methods:

- `average`: theta = mean_i theta_i (a uniform "model soup", Wortsman et al. 2022).
- `task-arithmetic` (Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR):
  theta = theta_0 + scale * sum_i tau_i.
- `ties` (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
  NeurIPS): trim each tau_i to its `density` share of largest-magnitude entries (per tensor),
  elect each entry's sign as the sign of sum_i of the trimmed tau_i, then take the disjoint
  mean, the mean over the runs whose trimmed entry is non-zero and has the elected sign;
  theta = theta_0 + scale * that mean.

Only the encoder is merged. Everything else a run holds (heads, per-task adapters) belongs to
its tasks and is copied; task names must differ between the runs. Runs must share the model
settings (backbone, conditioning); conditioning parameters that several runs hold and that
differ (MTL-LoRA's shared projections) cannot be merged meaningfully and are an error.
Mixture-of-experts encoders merge like dense ones: theta_0 is the backbone upcycled as for
training (every expert a copy of the dense FFN, token gates at zero), which is where every
run's experts and gates started. `scale` and `density` are refused where the method ignores
them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mtbert.config import AdaptConfig, ConfigError, to_dict, validate
from mtbert.model.multitask import MultitaskModel

DEFAULT_SCALE = {"average": 1.0, "task-arithmetic": 0.5, "ties": 1.0}
DEFAULT_DENSITY = 0.2  # TIES keeps the top 20% of each task vector (the paper's k)


def average(base: Tensor, tuned: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """mean_i theta_i (`base` and `scale` unused: the average needs neither)."""
    return torch.stack(list(tuned)).mean(0)


def task_arithmetic(base: Tensor, tuned: Sequence[Tensor], scale: float = 0.5) -> Tensor:
    return base + scale * torch.stack([t - base for t in tuned]).sum(0)


def trim(vector: Tensor, density: float) -> Tensor:
    """`vector` with all but its ceil(density * n) largest-magnitude entries set to zero."""
    keep = max(1, int(torch.tensor(density * vector.numel()).ceil()))
    if keep >= vector.numel():
        return vector.clone()
    threshold = vector.abs().flatten().kthvalue(vector.numel() - keep + 1).values
    return torch.where(vector.abs() >= threshold, vector, torch.zeros_like(vector))


def ties(base: Tensor, tuned: Sequence[Tensor], scale: float = 1.0,
         density: float = DEFAULT_DENSITY) -> Tensor:
    vectors = torch.stack([trim(t - base, density) for t in tuned])  # (R, ...)
    sign = torch.sign(vectors.sum(0))  # elected sign per entry
    agree = (torch.sign(vectors) == sign) & (vectors != 0)
    count = agree.sum(0)
    merged = (vectors * agree).sum(0) / count.clamp(min=1)
    return base + scale * merged


METHODS: dict[str, Callable[..., Tensor]] = {"average": average,
                                             "task-arithmetic": task_arithmetic, "ties": ties}


def merge_runs(runs: Sequence[str | Path], method: str, out: str | Path,
               scale: float | None = None, density: float | None = None,
               overwrite: bool = False) -> MultitaskModel:
    """Merge the models of `runs` with `method` into the model folder `out`; returns it. An
    existing `out` is replaced as `checkpoint.claim_output` allows (`overwrite`). None: the
    method's default `scale` (`DEFAULT_SCALE`) and `density` (ties only)."""
    from mtbert.checkpoint import claim_output
    from mtbert.model_folder import build_model, load_model, model_folder, save_model
    from mtbert.training import load_backbone

    if method not in METHODS:
        raise ConfigError(f"--method: unknown {method!r}; known: {sorted(METHODS)}")
    if len(runs) < 2:
        raise ConfigError("merge: give two runs or more")
    if scale is not None and method == "average":
        raise ConfigError("--scale applies to task-arithmetic and ties, not average")
    if density is not None and method != "ties":
        raise ConfigError(f"--density applies to ties, not {method}")
    if density is not None and not 0 < density <= 1:
        raise ConfigError(f"--density: must be in (0, 1], got {density}")
    scale = DEFAULT_SCALE[method] if scale is None else scale
    loaded = [load_model(run) for run in runs]
    configs = [config for _, _, config in loaded]
    claim_output(out, [*runs, *map(model_folder, runs), *configs[0].input_paths()], overwrite)
    for run, config in zip(runs[1:], configs[1:]):
        if to_dict(config.model) != to_dict(configs[0].model):
            raise ConfigError(f"merge: {run} has other model settings than {runs[0]} "
                              "(merged runs share backbone and conditioning)")
    tasks = [task for config in configs for task in config.tasks]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"merge: the runs' task names must differ, got {names}")
    # How the runs were trained from others (--from, --finetune) is theirs, not the merge's.
    merged_config = dataclasses.replace(configs[0], name=Path(out).name, tasks=tasks,
                                        adapt=AdaptConfig())
    validate(merged_config)

    base_encoder, _ = load_backbone(configs[0])
    model = build_model(merged_config, base_encoder)  # upcycles the backbone if runs had MoE
    base = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    options = {"density": density or DEFAULT_DENSITY} if method == "ties" else {}
    state = {}
    for key in model.state_dict():
        held = [m.state_dict()[key] for m, _, _ in loaded if key in m.state_dict()]
        if key in base:
            state[key] = METHODS[method](base[key], held, scale, **options)
        elif all(torch.equal(t, held[0]) for t in held[1:]):
            state[key] = held[0]
        else:
            raise ConfigError(f"merge: {key} is held by several runs with different values; "
                              "only the encoder and per-task parameters can be merged")
    model.load_state_dict(state)
    tokenizer = loaded[0][1]
    save_model(Path(out), model, tokenizer, merged_config,
               {"merged": {"runs": [str(r) for r in runs], "method": method, "scale": scale,
                           **options}})
    return model.eval()
