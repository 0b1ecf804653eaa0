"""What code a run was made by: recorded in `run.json` and an ablation's `result.json`.

`source` is a digest of the `mtbert` package's Python files as they are on disk (committed or
not), so two runs with the same `source` ran the same training code; `commit` and `dirty`
(uncommitted changes in the checkout, when the package is one) say where that code is.
"""

from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def code_version() -> dict[str, str | bool | None]:
    """{"commit", "dirty", "source", "torch"}: commit and dirty are None outside a git
    checkout."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status),
            "source": digest.hexdigest()[:16], "torch": torch.__version__}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE), *args], capture_output=True,
                              text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()
