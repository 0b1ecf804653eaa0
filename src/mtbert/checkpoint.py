"""Checkpoints and run folders on disk: safetensors and JSON only, written atomically,
verified on load, one process per run folder.

A checkpoint is a folder. It is first written as a hidden temporary folder beside its final
place, every file fsynced, a `manifest.json` with each file's sha256 written last, then the
folder is renamed into place: a crash leaves either the old checkpoint or the new one, never
half of one (a crash between the two renames leaves the old one as `.NAME.old`, which
`recover_interrupted_writes` puts back). Loading checks the manifest and reports a truncated
or altered file by name. `RunLock` keeps a second process out of a run folder in use.
`claim_output` is the rule every command that writes a folder checks first: it never replaces
what the user has unless told to, and never an input.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
REPLACED_RUN = ".replaced-run"  # `train --overwrite`: the old run, until the new one completes
# What a run writes into its folder; a folder holding any of these holds a run.
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "best", "checkpoints", "predictions",
             "report.html", "plots", "result.json", "error.txt", "tensorboard", "best-tasks")

log = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
    """A checkpoint folder is incomplete or a file does not match its manifest checksum."""


class RunFolderError(RuntimeError):
    """A run folder is in use by another process, or holds another run."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one stands."""


class OutputError(ValueError):
    """An output path would replace an input or something the user has not agreed to lose."""


def claim_output(path: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                 *, folder: bool = True, ignore: Iterable[str] = ()) -> Path:
    """Check, before any work, that a command may write `path` (a folder, or a file when not
    `folder`); returns `path`.

    An output that is, or holds, one of the command's `inputs` (compared by resolved path)
    is refused even with `overwrite`: replacing it would delete what the command reads. An
    existing output that is not empty (names in `ignore` aside) is refused unless
    `overwrite`; a folder then replaced through `write_checkpoint` stays until the new one is
    complete.
    """
    path = Path(path)
    target = path.resolve()
    for source in map(Path, inputs):
        if source.resolve() == target:
            raise OutputError(f"{path} is an input of this command ({source}); write the "
                              "output elsewhere")
        if source.resolve().is_relative_to(target):
            raise OutputError(f"{path} holds {source}, an input of this command; write the "
                              "output elsewhere")
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a folder")
    if not folder and path.is_dir():
        raise OutputError(f"{path} is a folder; the output is a file (give a file name)")
    if not folder and not path.parent.is_dir():
        raise OutputError(f"{path}: the folder {path.parent} does not exist")
    ignored = set(ignore)
    held = (sorted(p.name for p in path.iterdir() if p.name not in ignored) if path.is_dir()
            else [path.name] if path.exists() else [])
    if held and not overwrite:
        what = "exists" if not folder else (
            f"is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''})")
        raise OutputError(f"{path} {what}; give --overwrite to replace it, or choose another "
                          "output")
    return path


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


def _write_error(folder: Path, error: OSError) -> CheckpointWriteError:
    reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return CheckpointWriteError(f"cannot write {folder}: {reason}; the previous version (if "
                                "any) is kept")


def _umask_permissions(folder: Path) -> None:
    """Give `folder` and everything in it the permissions the process's umask gives new
    files (`mkdtemp` makes 0700 folders, safetensors 0600 files: unreadable to others)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_checkpoint(folder: Path, writer: Callable[[Path], None]) -> Path:
    """Atomically create or replace `folder` with what `writer(tmp_folder)` puts there; files
    and folders get the umask's usual permissions."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as error:
        raise _write_error(folder, error) from None
    try:
        try:
            writer(tmp)
            _umask_permissions(tmp)
        except OSError as error:
            raise _write_error(folder, error) from None
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


def written_whole(folder: Path) -> bool:
    """Whether `folder` holds just what `write_checkpoint` wrote there: the files its manifest
    lists and nothing else (a folder mtbert may rewrite without losing anything of yours)."""
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(listed, dict) and {p.name for p in folder.iterdir()} == {*listed, MANIFEST}


def verify_checkpoint(folder: Path, required: Iterable[str] = ()) -> None:
    """Raise CorruptCheckpointError unless every file matches `manifest.json` and the
    manifest lists each of the `required` files."""
    manifest_file = folder / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{folder}: missing or unreadable {MANIFEST} "
                                     f"({type(error).__name__})") from None
    if not isinstance(manifest, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str)
            and isinstance(e.get("bytes"), int) for e in manifest.values()):
        raise CorruptCheckpointError(f"{manifest_file}: not a manifest (a mapping of file "
                                     "names to their sha256 and bytes)")
    unlisted = [name for name in required if name not in manifest]
    if unlisted:
        raise CorruptCheckpointError(f"{manifest_file} does not list {', '.join(unlisted)}")
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file() or path.parent != folder:
            raise CorruptCheckpointError(f"{path} is missing")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise CorruptCheckpointError(f"{path} does not match its checksum (truncated or "
                                         "altered)")


def recover_interrupted_writes(parent: Path) -> None:
    """Undo what a process killed inside `write_checkpoint` left under `parent`: a `.NAME.old`
    whose NAME is gone is the last complete version and is put back; the other hidden
    temporary folders are half-written and removed."""
    if not parent.is_dir():
        return
    for old in parent.glob(".*.old"):
        final = parent / old.name[1:-len(".old")]
        if not final.exists():
            log.warning("restoring %s from %s (a write was interrupted)", final, old.name)
            old.rename(final)
    for leftover in parent.glob(".*.*"):
        if leftover.is_dir():
            log.info("removing %s, left by an interrupted write", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


class RunLock:
    """An exclusive OS lock (`flock`) on `RUN_DIR/.lock`, held while a process trains into
    the folder. The OS releases it when the process ends, crashed or not, so a stale lock
    never blocks a later run; a second process gets `RunFolderError` at once."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._file = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.run_dir / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip()[:20] or "unknown"
            handle.close()
            raise RunFolderError(f"{self.run_dir} is in use by another mtbert process (pid "
                                 f"{owner}); wait for it to end or choose another --run-dir"
                                 ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc_info) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def holds_run(run_dir: Path) -> list[str]:
    """The run files and folders in `run_dir` (empty when it holds no run)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def clear_run(run_dir: Path, everything: bool = False) -> None:
    """Remove a run's files from `run_dir`; other files stay unless `everything` (for folders
    mtbert owns, such as an ablation's). The lock file always stays."""
    recover_interrupted_writes(run_dir)
    names = [p.name for p in run_dir.iterdir()] if everything else holds_run(run_dir)
    for path in (run_dir / name for name in names if name != LOCK_FILE):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def set_run_aside(run_dir: Path) -> Path:
    """Move the run in `run_dir` into `run_dir/.replaced-run` (replacing one an earlier
    `--overwrite` left there) so that a new run starts in an empty folder while the old one
    stays on disk; `drop_replaced_run` removes it once the new run is complete."""
    recover_interrupted_writes(run_dir)
    aside = run_dir / REPLACED_RUN
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    for name in holds_run(run_dir):
        (run_dir / name).rename(aside / name)
    return aside


def drop_replaced_run(run_dir: Path) -> None:
    shutil.rmtree(run_dir / REPLACED_RUN, ignore_errors=True)


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
    write_text_atomically(path, json.dumps(data, indent=1))


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a crash leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{path} is unreadable: {error}") from None
