"""Get the standard task files and check a data folder: `mtbert data download | check`.

The files are those of the Stanford CS224N default final project (multitask minBERT),
fetched from `BASE_URL` or a mirror (`--mirror URL`, `file://` allowed) and kept only when
their sha256 matches `FILES`. The sums are those of this project's copies (`../shared/data`),
which were not compared with the public server from here (no network on these machines).
Our `quora-train.csv` is an 11,000-pair subset of the public 141,506-pair file, so its sum
identifies the subset only: a different `quora-train.csv` is kept, with a warning that it
could not be verified, only if it reads as that task's training file (columns, labels) with
at least the subset's rows. No file larger than `MAX_FILE_BYTES` is kept. Offline, copy the
files named in `FILES` into the folder by hand.

`check` also honours a folder's own `SHA256SUMS` (the `sha256sum` format, paths relative to the
folder, as `../shared/data/glue` ships): a checked file listed there must match its sum.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mtbert.checkpoint import claim_output, file_sha256
from mtbert.config import TaskConfig
from mtbert.data.readers import DataError, ReadReport, stream_examples
from mtbert.data.tasks import SPLITS, reading_options, split_file
from mtbert.presets import PRESETS

log = logging.getLogger(__name__)

# The starter code's data folder (CS224N default final project, multitask minBERT).
BASE_URL = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/main/data/"


@dataclass(frozen=True)
class DataFile:
    sha256: str
    rows: int  # data rows, malformed ones included
    subset: bool = False  # our copy is a subset of the public file: a mismatch is not an error


FILES: dict[str, DataFile] = {
    "ids-sst-train.csv": DataFile(
        "03b2b625c090f94a6afd59f114cde5282e2053aab0b101e87ed695d8a0c5b1df", 8544),
    "ids-sst-dev.csv": DataFile(
        "a186ce94577635fbe10beaaddd50f16cccf6c30973221cefdf90deed2a584bfe", 1101),
    "ids-sst-test-student.csv": DataFile(
        "bdd5a767faa0c26782117e37767ece154c30d5d04fb8727d09c71e3850a55c7b", 2210),
    "ids-cfimdb-train.csv": DataFile(
        "140fc513045a966109faed46a5c7a898767b96714d71bcb9c15f659129fadcea", 1707),
    "ids-cfimdb-dev.csv": DataFile(
        "3087f571b66860fe5d035b5a018d08202ad3fd3720e4821c04b2acf6c7ded559", 245),
    "ids-cfimdb-test-student.csv": DataFile(
        "7ae611548c9eac879e9ebb406cc9f8ae68ff12f78090e4965af5cbdfa06240f4", 488),
    "quora-train.csv": DataFile(  # the 11,000-pair subset; the public file has 141,506
        "d251d734467ddb240acef8be5d014f8fb330edac46098ee069d88a753cb7a56a", 11000, subset=True),
    "quora-dev.csv": DataFile(
        "bfa3cc954a9ba300ae776a980141de65f622a3c1b97e3fd905d63245bc36d5ad", 20214),
    "sts-train.csv": DataFile(
        "15d12efc2d656fffb1d61ac1f08ec4227f43925fd16f420c037cbd063699c21b", 6040),
    "sts-dev.csv": DataFile(
        "ce3cad6f16062586ac7ba462c28b010a9be10c530fd5074165860d7b7ab4e93d", 863),
    "sts-test-student.csv": DataFile(
        "dee455745b72e9ca3ff74e7c056bd73e34bad5b8d5641045a2c1e7e131866f47", 1725),
}
OFFLINE_HINT = "offline, copy the task files into the folder by hand (names: `mtbert data check`)"
SUMS_FILE = "SHA256SUMS"
MAX_FILE_BYTES = 64 << 20  # the largest task file (the public quora-train.csv) is ~20 MB


def download(dest: str | Path, mirror: str | None = None,
             files: dict[str, DataFile] = FILES, overwrite: bool = False) -> list[str]:
    """Fetch each file of `files` from `mirror` (a base URL; default `BASE_URL`) into `dest`,
    keeping a file only when its sha256 matches; returns one line of outcome per file.
    A file already in `dest` with the right sum is not fetched again; one with another sum
    (the user's own) is refused before any download unless `overwrite`, and then replaced
    only by a complete, verified file (`checkpoint.claim_output`)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = (mirror or BASE_URL).rstrip("/") + "/"
    there = {name for name, expected in files.items() if is_standard(dest / name, expected)}
    for name in files.keys() - there:
        claim_output(dest / name, overwrite=overwrite, folder=False)
    lines = []
    for name, expected in files.items():
        target = dest / name
        if name in there:
            lines.append(f"{name}: already there, sha256 ok")
            continue
        tmp = dest / f".part-{name}"  # the suffix kept: the reader picks the format by it
        try:
            _fetch(base + name, tmp)
            digest = file_sha256(tmp)
            if digest != expected.sha256 and not expected.subset:
                raise DataError(f"{base + name}: sha256 {digest} does not match the expected "
                                f"{expected.sha256}; the file was not kept")
            if digest != expected.sha256:
                _check_superset(base + name, tmp, expected)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        if digest == expected.sha256:
            lines.append(f"{name}: downloaded, sha256 ok")
        else:
            lines.append(f"{name}: downloaded, NOT verified (our sum is that of an "
                         f"{expected.rows}-row subset of the public file)")
    return lines


def is_standard(path: Path, expected: DataFile) -> bool:
    """Whether `path` is a file with the sha256 of the standard one."""
    return path.is_file() and file_sha256(path) == expected.sha256


def _check_superset(url: str, path: Path, subset: DataFile) -> None:
    """Refuse a file that cannot be the public file our subset came from: one that does not
    read as the task's file or has fewer rows than the subset."""
    name = path.name.removeprefix(".part-")
    task, split = next((task, split) for task in map(_preset_task, PRESETS) for split in SPLITS
                       if (split_file(task, split, ".") or Path()).name == name)
    read = _check_file(task, split, path)
    if read.problem or read.rows < subset.rows:
        found = (read.problem or f"{read.rows} rows").replace(str(path), name)
        raise DataError(f"{url}: its sha256 is not that of this project's {subset.rows}-row "
                        f"subset, and it is not a larger {task.name} {split} file ({found}); "
                        "the file was not kept")


def _fetch(url: str, path: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
            size = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                size += len(block)
                if size > MAX_FILE_BYTES:
                    raise DataError(f"{url}: larger than {MAX_FILE_BYTES} bytes, more than any "
                                    "task file; the file was not kept")
                f.write(block)
    except DataError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataError(f"{url}: download failed ({reason}); {OFFLINE_HINT}") from None


@dataclass
class FileCheck:
    """One task file of a data folder: rows read, skipped rows, or the problem with it, and
    whether it is the standard file (None: no standard sum is known for its name)."""

    name: str  # the path inside the checked folder
    rows: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    problem: str | None = None  # missing, unreadable or damaged: the folder is not usable
    standard: bool | None = None
    listed: bool = False  # matches its sum in the folder's SHA256SUMS

    def lines(self, folder: Path) -> list[str]:
        if self.problem:
            return [f"ERROR {self.problem}"]
        expected = FILES.get(self.name)
        status, note = "ok   ", ""
        if self.standard is False:
            status = "other"
            note = (f"; NOT verified: the sum known here is this project's {expected.rows}-row "
                    "subset of the public file" if expected.subset else
                    f"; not the standard file (its sha256 differs; the standard file has "
                    f"{expected.rows} rows)")
        if self.listed:
            note += f"; sha256 as in {SUMS_FILE}"
        lines = [f"{status} {self.name}: {self.rows} rows, {len(self.skipped)} malformed{note}"]
        return lines + [f"      {folder / self.name}:{line}: {reason}"
                        for line, reason in self.skipped]


def check(folder: str | Path, tasks: Sequence[str] | None = None) -> list[FileCheck]:
    """Read every file of the preset `tasks` (default: those whose files `download` fetches) in
    `folder` as training would (columns by name, labels checked) and compare it with the
    standard file's sha256 in `FILES`; malformed rows and files other than the standard ones
    are listed, not fatal. A file whose sum differs from the one the folder's own
    `SHA256SUMS` lists for it is damaged or replaced: a problem."""
    folder = Path(folder)
    sums = folder_sums(folder)
    results = []
    for preset in tasks or DOWNLOADED_PRESETS:
        if preset not in PRESETS:
            raise DataError(f"unknown task {preset!r}; known: {', '.join(PRESETS)}")
        task = _preset_task(preset)
        for split in SPLITS:
            path = split_file(task, split, folder)
            if path is not None:
                result = _check_file(task, split, path, path.relative_to(folder).as_posix())
                _compare_sums(result, path, sums, folder)
                results.append(result)
    return results


def _compare_sums(result: FileCheck, path: Path, sums: dict[str, str], folder: Path) -> None:
    """Mark `result` standard (its sum in `FILES`) and listed (its sum in the folder's
    `SHA256SUMS`; a different sum there is a problem), hashing the file once for both."""
    standard, listed = FILES.get(result.name), sums.get(result.name)
    if result.problem or not (standard or listed):
        return
    digest = file_sha256(path)
    if standard:
        result.standard = digest == standard.sha256
    if listed:
        result.listed = digest == listed
        if not result.listed:
            result.problem = (f"{path}: sha256 differs from its sum in {folder / SUMS_FILE} "
                              "(damaged or replaced)")


def folder_sums(folder: Path) -> dict[str, str]:
    """{path inside `folder`: sha256} from `folder/SHA256SUMS` (`sha256sum`'s output: the
    hex digest, two spaces or a space and `*`, the path); {} where the folder has none."""
    path = folder / SUMS_FILE
    if not path.is_file():
        return {}
    sums = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else ""
        if len(digest) != 64 or not all(c in "0123456789abcdefABCDEF" for c in digest) \
                or not name:
            raise DataError(f"{path}:{number}: not a sha256sum line (digest, two spaces, path)")
        sums[name] = digest.lower()
    return sums


def _downloaded(preset: str) -> bool:
    task = _preset_task(preset)
    names = [split_file(task, split, ".") for split in SPLITS]
    return all(name is None or name.name in FILES for name in names)


def _preset_task(preset: str) -> TaskConfig:
    return TaskConfig(name=preset, **PRESETS[preset])


def _check_file(task: TaskConfig, split: str, path: Path, name: str | None = None
                ) -> FileCheck:
    result = FileCheck(name or path.name)
    if not path.is_file():
        result.problem = f"{path}: missing"
        return result
    report = ReadReport(path=path, examples=[], skipped=[])  # rows are counted, not held
    try:
        with _quiet_reader():
            read = sum(1 for _ in stream_examples(path, report=report,
                                                  **reading_options(task, split)))
    except DataError as error:
        result.problem = str(error)
        return result
    result.rows = read + report.skipped_count
    result.skipped = report.skipped
    return result


@contextlib.contextmanager
def _quiet_reader() -> Iterator[None]:
    """The check lists skipped rows itself; the reader's own warnings would repeat them."""
    reader_log = logging.getLogger("mtbert.data.readers")
    level = reader_log.level
    reader_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        reader_log.setLevel(level)


DOWNLOADED_PRESETS = [preset for preset in PRESETS if _downloaded(preset)]  # CS224N's tasks
