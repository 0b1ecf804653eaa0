"""Nothing a user owns is deleted, no edge case answers wrong in silence (issue 35): every
command that writes a folder goes through `checkpoint.claim_output`; inputs are never
outputs; malformed rows, unknown columns, bare strings and changed data files are reported."""

import hashlib
import logging
import os
import shutil
import stat

import pytest

import mtbert
from mtbert.checkpoint import CheckpointWriteError
from mtbert.cli import main
from mtbert.data.download import FILES
from mtbert.data.readers import ReadReport, iter_examples
from mtbert.model.loading import CheckpointError

from conftest import write_tsv


def snapshot(folder):
    """Every file under `folder` (relative path -> sha256): what must survive a refusal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tiny_run, tiny_data, tmp_path):
    """Copies a careless user might point an output at: parent/run (a trained run),
    parent/data (task files) and mine/ (a folder of the user's own)."""
    shutil.copytree(tiny_run, tmp_path / "parent" / "run")
    shutil.copytree(tiny_data, tmp_path / "parent" / "data")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes\n")
    return tmp_path


def walk_command(command, world, tiny_backbone):
    """argv of each writing command, given its output; the input is parent/run (or, for
    training, parent/data)."""
    run = str(world / "parent" / "run")
    return {
        "export hf": lambda out: ["export", run, out, "--format", "hf"],
        "export sentence-transformers": lambda out: ["export", run, out, "--format",
                                                     "sentence-transformers"],
        "export onnx": lambda out: ["export", run, out, "--format", "onnx"],
        "merge": lambda out: ["merge", run, run, "--method", "average", "--out", out],
        "train": lambda out: ["train", "--data-dir", str(world / "parent" / "data"),
                              "--run-dir", out, "tasks=[sst]", f"model.backbone={tiny_backbone}",
                              "model.max_length=32", "train.max_steps=1"],
        "report": lambda out: ["report", run],
        "data download": lambda out: ["data", "download", "--dest", out, "--mirror",
                                      (world / "no-mirror").as_uri()],
    }[command]


# (command, case): "= input" and "holds input" are refused even with --overwrite; "non-empty"
# without it. report's output (RUN/plots) and download's (task files) name no input.
WALK = [(c, case) for c in ("export hf", "export sentence-transformers", "export onnx",
                            "merge", "train") for case in ("= input", "holds input", "non-empty")]
WALK += [("report", "non-empty"), ("data download", "non-empty")]


@pytest.mark.parametrize("command, case", WALK)
def test_every_writer_refuses_an_input_or_a_non_empty_output(world, tiny_backbone, capsys,
                                                             command, case):
    input_dir = world / "parent" / ("data" if command == "train" else "run")
    if command == "report":
        (input_dir / "plots").mkdir()
        (input_dir / "plots" / "my-figure.png").write_bytes(b"mine")
        out = input_dir / "plots"
    elif command == "data download":
        out = world / "mine"
        (out / "ids-sst-dev.csv").write_text("id,sentence,sentiment\nx,my own,1\n")
    else:
        out = {"= input": input_dir, "holds input": input_dir.parent,
               "non-empty": world / "mine"}[case]
    argv = walk_command(command, world, tiny_backbone)(str(out))
    before = snapshot(world)
    for extra in ([], ["--overwrite"]) if case != "non-empty" else ([],):
        assert main([*argv, *extra]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        expected = {"= input": "is an input of this command", "holds input": "an input of "
                    "this command", "non-empty": "give --overwrite to replace it"}[case]
        assert expected in error and str(out) in error, error
        assert snapshot(world) == before


def test_overwrite_replaces_a_user_folder_only_once_the_new_one_is_complete(world, monkeypatch,
                                                                            capsys):
    run, mine = world / "parent" / "run", world / "mine"
    from mtbert import export as export_module

    def failing(folder, tokenizer):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "write_hf_tokenizer", failing)
    with pytest.raises(CheckpointWriteError, match="the disk is full"):
        export_module.export(run, mine, "hf", overwrite=True)
    assert (mine / "notes.txt").read_text() == "my notes\n"
    assert sorted(p.name for p in world.iterdir()) == ["mine", "parent"]  # no temp left
    monkeypatch.undo()
    assert main(["export", str(run), str(mine), "--format", "hf", "--overwrite"]) == 0
    assert not (mine / "notes.txt").exists()
    assert list(mtbert.load(mine).tasks) == ["sst", "quora", "sts"]


def test_report_rewrites_its_own_plots_without_overwrite(world, capsys):
    run = world / "parent" / "run"
    assert main(["report", str(run)]) == 0
    first = set(snapshot(run / "plots"))
    assert main(["report", str(run)]) == 0  # plots/ holds only what the last report wrote
    assert set(snapshot(run / "plots")) == first and "report.html" in capsys.readouterr().out


# ---------------------------------------------------------------- the 11 cases of the issue


def test_case1_export_into_the_run_itself_keeps_the_run(world, capsys):
    run = world / "parent" / "run"
    before = snapshot(run)
    assert main(["export", str(run), str(run), "--format", "hf", "--overwrite"]) == 2
    assert f"{run} is an input of this command" in capsys.readouterr().err
    assert snapshot(run) == before


def test_case2_export_into_the_folder_holding_the_run_keeps_it(world, capsys):
    parent = world / "parent"
    before = snapshot(parent)
    assert main(["export", str(parent / "run"), str(parent), "--format", "hf",
                 "--overwrite"]) == 2
    assert f"{parent} holds {parent / 'run'}, an input" in capsys.readouterr().err
    assert snapshot(parent) == before


def test_case3_export_into_a_non_empty_folder_needs_overwrite(world, capsys):
    assert main(["export", str(world / "parent" / "run"), str(world / "mine"), "--format",
                 "hf"]) == 2
    assert "is not empty (notes.txt); give --overwrite" in capsys.readouterr().err
    assert (world / "mine" / "notes.txt").read_text() == "my notes\n"


def test_case4_merge_keeps_its_runs_and_a_non_empty_out(world, capsys):
    run = world / "parent" / "run"
    before = snapshot(world)
    assert main(["merge", str(run), str(run), "--method", "average", "--out", str(run),
                 "--overwrite"]) == 2
    assert f"{run} is an input of this command" in capsys.readouterr().err
    assert main(["merge", str(run), str(run), "--method", "average", "--out",
                 str(world / "mine")]) == 2
    assert "is not empty (notes.txt)" in capsys.readouterr().err
    assert snapshot(world) == before


def test_case5_predict_never_writes_over_its_input(tiny_run, tmp_path, capsys):
    source = tmp_path / "f.csv"
    source.write_text("id,sentence\na,good movie\n", encoding="utf-8")
    assert main(["predict", str(tiny_run), "--task", "sst", "--input", str(source),
                 "--output", str(source)]) == 2
    assert f"{source} is an input of this command" in capsys.readouterr().err
    assert source.read_text(encoding="utf-8") == "id,sentence\na,good movie\n"


def test_case6_a_row_with_more_fields_than_the_header_is_malformed(tmp_path, caplog):
    source = tmp_path / "rows.csv"
    source.write_text("id,sentence\na,great film\nc,terrible, but I loved it\nd,fine\n",
                      encoding="utf-8")
    report = ReadReport(source, [], [])
    with caplog.at_level(logging.WARNING):
        examples = list(iter_examples(source, ["sentence"], report=report))
    assert [e.id for e in examples] == ["a", "d"]
    assert report.skipped == [(3, "row has 3 fields, the header 2 (a delimiter inside an "
                                  "unquoted text?)")]
    assert any(f"{source}:3: skipped row" in r.getMessage() for r in caplog.records)


def test_case7_an_id_column_that_does_not_exist_is_an_error(tiny_run, tmp_path, capsys):
    source = tmp_path / "in.csv"
    source.write_text("id,sentence\na,good movie\n", encoding="utf-8")
    assert main(["predict", str(tiny_run), "--task", "sst", "--input", str(source),
                 "--id-column", "nosuch", "--output", str(tmp_path / "out.jsonl")]) == 2
    assert "header lacks column(s) 'nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("content, message", [
    ("id,sentence\n" + "".join(f"{i},caf\xe9 {i}\n" for i in range(4)),
     "4 of 4 rows are malformed (all of them)"),
    ("id,sentence\na,good\n" + "".join(f"{i},\n" for i in range(5)),
     "5 of 6 rows are malformed (more than 5%)"),
])
def test_case8_prediction_applies_the_skipped_share_limit(tiny_run, tmp_path, capsys, content,
                                                          message):
    source = tmp_path / "in.csv"
    source.write_bytes(content.encode("latin-1"))
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(tiny_run), "--task", "sst", "--input", str(source),
                 "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_case9_a_bare_string_is_refused_with_the_fix(tiny_run):
    model = mtbert.load(tiny_run)
    with pytest.raises(TypeError, match=r"for one text call model\.predict\('sst', \[text\]\)"):
        model.predict("sst", "great")
    with pytest.raises(TypeError, match=r"model\.encode\(\[text\]\)"):
        model.encode("great")


def test_case10_data_check_reports_files_that_are_not_the_standard_ones(data_dir, tmp_path,
                                                                        capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("ids-sst-train.csv", "ids-sst-dev.csv", "ids-sst-test-student.csv"):
        shutil.copy(data_dir / name, folder / name)
    train = folder / "ids-sst-train.csv"
    lines = train.read_text(encoding="utf-8").splitlines(keepends=True)
    train.write_text("".join(lines[:len(lines) // 2]), encoding="utf-8")  # cut in half
    dev = folder / "ids-sst-dev.csv"
    dev.write_text(dev.read_text(encoding="utf-8").replace("\t4\n", "\t0\n", 1),
                   encoding="utf-8")  # one label flipped
    assert main(["data", "check", str(folder), "--tasks", "sst"]) == 0
    out = capsys.readouterr().out
    assert (f"other ids-sst-train.csv: {len(lines) // 2 - 1} rows, 0 malformed; not the "
            f"standard file (its sha256 differs; the standard file has "
            f"{FILES['ids-sst-train.csv'].rows} rows)") in out
    assert "other ids-sst-dev.csv: 1101 rows, 0 malformed; not the standard file" in out
    assert "ok    ids-sst-test-student.csv: 2210 rows" in out
    assert ("3 task files readable in " in out and "2 of them are not the standard files: "
            "ids-sst-train.csv, ids-sst-dev.csv" in out)


@pytest.mark.parametrize("value", ["-5", "0"])
def test_case11_batch_size_is_checked_before_any_work(tiny_run, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(tiny_run), "--task", "sst", "--input", "-", "--batch-size", value])
    assert exit_.value.code == 2
    assert "argument --batch-size: " in capsys.readouterr().err


def test_case11_output_paths_are_checked_first_and_named_as_given(tiny_run, tmp_path, capsys,
                                                                  monkeypatch):
    source = tmp_path / "in.csv"
    source.write_text("id,sentence\na,good movie\n", encoding="utf-8")
    monkeypatch.setattr(mtbert.api.Model, "predict_examples",
                        lambda *args: pytest.fail("predicted before checking the output"))
    missing = tmp_path / "nowhere" / "out.csv"
    (tmp_path / "out.jsonl").mkdir()
    for out, message in ((missing, f"{missing}: the folder {missing.parent} does not exist"),
                         (tmp_path / "out.jsonl", f"{tmp_path / 'out.jsonl'} is a folder")):
        assert main(["predict", str(tiny_run), "--task", "sst", "--input", str(source),
                     "--output", str(out)]) == 2
        error = capsys.readouterr().err
        assert message in error and ".partial" not in error


def test_case11_written_folders_get_the_umask_permissions(tiny_run, tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["export", str(tiny_run), str(tmp_path / "hf"), "--format", "hf"]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "hf", *(tmp_path / "hf").rglob("*")]}
    assert modes["hf"] == 0o755 and modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o755, 0o644}, modes


def test_case11_export_of_an_unknown_task_names_the_task(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), str(tmp_path / "out"), "--format", "hf", "--task",
                 "nosuch"]) == 2
    error = capsys.readouterr().err
    assert "unknown task 'nosuch'; this model's tasks: sst, quora, sts" in error
    assert "--quantize" not in error


def test_case11_load_of_a_file_says_it_is_a_file(tiny_run):
    with pytest.raises(CheckpointError, match="model.safetensors: is a file, not a folder"):
        mtbert.load(tiny_run / "best" / "model.safetensors")


def test_data_download_never_replaces_a_users_own_file(tmp_path, capsys):
    dest = tmp_path / "dest"
    dest.mkdir()
    write_tsv(dest / "ids-sst-dev.csv", ["id", "sentence", "sentiment"], [["a", "mine", 1]])
    before = snapshot(dest)
    assert main(["data", "download", "--dest", str(dest), "--mirror",
                 (tmp_path / "none").as_uri()]) == 2
    assert f"{dest / 'ids-sst-dev.csv'} exists; give --overwrite" in capsys.readouterr().err
    assert snapshot(dest) == before
