"""Checkpoints on disk: safetensors and JSON only, written atomically, verified on load.

A checkpoint is a folder. It is first written as a hidden temporary folder beside its final
place, every file fsynced, a `manifest.json` with each file's sha256 written last, then the
folder is renamed into place: a crash leaves either the old checkpoint or the new one, never
half of one. Loading checks the manifest and reports a truncated or altered file by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

MANIFEST = "manifest.json"


class CorruptCheckpointError(ValueError):
    """A checkpoint folder is incomplete or a file does not match its manifest checksum."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(folder: Path, writer: Callable[[Path], None]) -> Path:
    """Atomically create or replace `folder` with what `writer(tmp_folder)` puts there."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        writer(tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for p in [*files, tmp / MANIFEST]:
            _fsync(p)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        _fsync(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def verify_checkpoint(folder: Path) -> None:
    """Raise CorruptCheckpointError unless every file matches `manifest.json`."""
    manifest_file = folder / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{folder}: missing or unreadable {MANIFEST} "
                                     f"({type(error).__name__})") from None
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is missing")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise CorruptCheckpointError(f"{path} does not match its checksum (truncated or "
                                         "altered)")


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


def load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise CorruptCheckpointError(f"{path} is not a valid safetensors file: {error}") from None


def save_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def write_json_atomically(path: Path, data: dict) -> None:
    """Replace `path` with `data` as JSON in one step: a crash leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    save_json(tmp, data)
    os.replace(tmp, path)


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{path} is unreadable: {error}") from None
