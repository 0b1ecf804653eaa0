"""Mixed precision: whether the matrix products of a step run in bf16, chosen per device.

`train.precision: auto` (the default) trains under bf16 autocast where the device has fast
bf16 matrix units and in fp32 elsewhere. Autocast runs matrix products (linear layers,
attention) in bf16 and keeps master weights, gradients, optimizer state, layer norms, losses
and metrics in fp32: the recipe of Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep
Learning Training", which matches fp32 accuracy without loss scaling (bf16 keeps fp32's
exponent range).

Fast bf16 means: a CUDA device that supports bf16 (compute capability 8.0+), or a CPU with
native bf16 instructions (x86: AVX512-BF16 or AMX; elsewhere: what oneDNN reports, e.g. Arm's
BF16 extension). oneDNN also "supports" bf16 on plain AVX-512 x86 CPUs by emulation, which is
slower than fp32, so on x86 the instructions themselves are checked.
"""

from __future__ import annotations

import contextlib
import platform

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (see the module docstring)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


def has_fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_fast_bf16()


def resolve_precision(setting: str, device: torch.device) -> str:
    """`fp32` or `bf16` for `train.precision` (`auto`, `fp32`, `bf16`) on `device`."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {setting!r}")
    if setting == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    return setting


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for `precision == "bf16"`; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
