"""`mtbert data check | download`: a data folder is validated, downloads are verified."""

import hashlib
import shutil

import pytest

from mtbert.cli import main
from mtbert.data.download import FILES, DataFile, download
from mtbert.data.readers import DataError

from conftest import write_tsv


def test_check_passes_on_the_task_data_and_names_the_malformed_rows(data_dir, capsys):
    assert main(["data", "check", str(data_dir)]) == 0
    out = capsys.readouterr().out
    quora_dev = data_dir / "quora-dev.csv"
    assert f"{quora_dev}:2577: empty 'is_duplicate'" in out
    assert f"{quora_dev}:14222: empty 'sentence2'" in out
    assert "quora-dev.csv: 20214 rows, 2 malformed" in out
    assert f"{len(FILES)} task files ok" in out


def sst_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    header = ["id", "sentence", "sentiment"]
    write_tsv(folder / "ids-sst-train.csv", header, [["a", "good film", 4], ["b", "bad", 0]])
    write_tsv(folder / "ids-sst-dev.csv", header, [["c", "fine", 2], ["d", "", 3]])
    write_tsv(folder / "ids-sst-test-student.csv", ["id", "sentence"], [["e", "great"]])
    return folder


def test_check_lists_malformed_rows_and_accepts_a_usable_folder(tmp_path, capsys):
    folder = sst_folder(tmp_path)
    assert main(["data", "check", str(folder), "--tasks", "sst"]) == 0
    out = capsys.readouterr().out
    assert f"{folder / 'ids-sst-dev.csv'}:3: empty 'sentence'" in out
    assert ("other ids-sst-train.csv: 2 rows, 0 malformed; not the standard file (its sha256 "
            "differs; the standard file has 8544 rows)") in out
    assert "3 task files readable" in out and "3 of them are not the standard files" in out


def test_a_file_with_a_known_sum_and_a_listed_one_is_hashed_once(tmp_path, capsys,
                                                                 monkeypatch):
    import mtbert.data.download as download_module

    folder = sst_folder(tmp_path)
    names = ["ids-sst-train.csv", "ids-sst-dev.csv", "ids-sst-test-student.csv"]
    (folder / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names))
    hashed = []
    real = download_module.file_sha256
    monkeypatch.setattr(download_module, "file_sha256",
                        lambda path: hashed.append(path.name) or real(path))
    assert main(["data", "check", str(folder), "--tasks", "sst"]) == 0
    out = capsys.readouterr().out
    # Each file has a standard sum (FILES) and its folder's: one hash serves both.
    assert sorted(hashed) == sorted(names)
    assert ("other ids-sst-train.csv: 2 rows, 0 malformed; not the standard file (its sha256 "
            "differs; the standard file has 8544 rows); sha256 as in SHA256SUMS") in out


@pytest.mark.parametrize("breakage, message", [
    ("missing", "ids-sst-test-student.csv: missing"),
    ("no label column", "header lacks column(s) 'sentiment'"),
    ("label out of range", ":2: label 9 is not a class in 0..4"),
    ("empty", "ids-sst-dev.csv: file is empty"),
])
def test_check_fails_on_a_missing_or_unreadable_file(tmp_path, capsys, breakage, message):
    folder = sst_folder(tmp_path)
    dev = folder / "ids-sst-dev.csv"
    if breakage == "missing":
        (folder / "ids-sst-test-student.csv").unlink()
    elif breakage == "no label column":
        write_tsv(dev, ["id", "sentence"], [["c", "fine"]])
    elif breakage == "label out of range":
        write_tsv(dev, ["id", "sentence", "sentiment"], [["c", "fine", 9]])
    else:
        dev.write_text("")
    assert main(["data", "check", str(folder), "--tasks", "sst"]) == 2
    captured = capsys.readouterr()
    assert message in captured.out
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("mtbert data: error: 1 of 3 task files are missing or unreadable")


@pytest.fixture
def mirror(data_dir, tmp_path):
    """A file:// mirror holding copies of the task files."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    for name in FILES:
        shutil.copy(data_dir / name, folder / name)
    return folder


def test_download_from_a_mirror_checks_every_sum(mirror, tmp_path, capsys):
    dest = tmp_path / "dest"
    assert main(["data", "download", "--dest", str(dest), "--mirror", mirror.as_uri()]) == 0
    out = capsys.readouterr().out
    assert out.count("downloaded, sha256 ok") == len(FILES)
    for name in FILES:
        assert (dest / name).read_bytes() == (mirror / name).read_bytes()
    assert main(["data", "download", "--dest", str(dest), "--mirror", mirror.as_uri()]) == 0
    assert capsys.readouterr().out.count("already there, sha256 ok") == len(FILES)


def test_a_checksum_mismatch_is_an_error_and_the_file_is_not_kept(mirror, tmp_path, capsys):
    with open(mirror / "sts-dev.csv", "a", encoding="utf-8") as f:
        f.write("863\tx\ta\tb\t1.0\n")
    dest = tmp_path / "dest"
    assert main(["data", "download", "--dest", str(dest), "--mirror", mirror.as_uri()]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("mtbert data: error: ") and "sts-dev.csv: sha256" in error
    assert "the file was not kept" in error
    assert not (dest / "sts-dev.csv").exists()
    assert not list(dest.glob(".part-*"))


def test_the_quora_train_subset_sum_does_not_reject_the_public_file(mirror, tmp_path, capsys):
    with open(mirror / "quora-train.csv", "a", encoding="utf-8") as f:
        f.write("11000\tq\ta?\tb?\t0\n")  # stands in for the full public file
    assert main(["data", "download", "--dest", str(tmp_path / "d"), "--mirror",
                 mirror.as_uri()]) == 0
    assert "quora-train.csv: downloaded, NOT verified" in capsys.readouterr().out


@pytest.mark.parametrize("content, reason", [
    ("<html>moved</html>\n", "header lacks column"),
    ("id\tsentence1\tsentence2\tis_duplicate\n1\ta?\tb?\t0\n", "(1 rows)"),
])
def test_a_quora_train_file_that_cannot_be_the_public_one_is_not_kept(mirror, tmp_path, capsys,
                                                                      content, reason):
    (mirror / "quora-train.csv").write_text(content, encoding="utf-8")
    dest = tmp_path / "d"
    assert main(["data", "download", "--dest", str(dest), "--mirror", mirror.as_uri()]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "quora-train.csv: its sha256 is not that of this project's 11000-row subset" in error
    assert reason in error and "the file was not kept" in error
    assert not (dest / "quora-train.csv").exists() and not list(dest.glob(".part-*"))


def test_a_file_larger_than_any_task_file_is_not_kept(tmp_path, monkeypatch):
    import mtbert.data.download
    monkeypatch.setattr(mtbert.data.download, "MAX_FILE_BYTES", 10)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "a.csv").write_text("id,sentence\n1,good\n")
    files = {"a.csv": DataFile(hashlib.sha256(b"id,sentence\n1,good\n").hexdigest(), 1)}
    with pytest.raises(DataError, match="a.csv: larger than 10 bytes.*not kept"):
        download(tmp_path / "dest", mirror.as_uri(), files)
    assert not list((tmp_path / "dest").iterdir())


def test_download_without_the_task_data(tmp_path):
    """Table, mirror and failures on small files (no copy of the task data needed)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "a.csv").write_text("id,sentence\n1,good\n")
    files = {"a.csv": DataFile(hashlib.sha256(b"id,sentence\n1,good\n").hexdigest(), 1)}
    assert download(tmp_path / "dest", mirror.as_uri(), files) == ["a.csv: downloaded, sha256 ok"]
    with pytest.raises(DataError, match="b.csv: download failed.*by hand"):
        download(tmp_path / "dest", mirror.as_uri(), {"b.csv": DataFile("0" * 64, 1)})
