"""`mtbert predict RUN --task T --input FILE|-`: files in, predictions out, streamed in chunks."""

import csv
import json
import subprocess
import sys

import pytest

import mtbert
from mtbert import api
from mtbert.cli import main
from mtbert.data.tasks import read_split


@pytest.fixture(scope="module")
def model(tiny_run):
    return mtbert.load(tiny_run)


@pytest.fixture(scope="module")
def sst(model):
    """The tiny sst dev examples and what the API predicts for them."""
    examples = read_split(model.model.tasks["sst"], "dev", model.config.data_dir)
    return examples, model.predict("sst", [e.texts[0] for e in examples])


def write_rows(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)


def read_output(path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines()]
    return list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv"
                               else ","))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_predict_files_by_column_name(tiny_run, sst, tmp_path, fmt):
    examples, expected = sst
    rows = [{"note": "x", "text": e.texts[0], "key": f"row-{e.id}"} for e in examples]
    source = tmp_path / f"in.{fmt}"
    write_rows(source, rows, fmt)
    out = tmp_path / f"out.{'csv' if fmt == 'jsonl' else 'jsonl'}"
    assert main(["predict", str(tiny_run), "--task", "sst", "--input", str(source),
                 "--output", str(out), "--text-columns", "text", "--id-column", "key",
                 "--probabilities"]) == 0
    written = read_output(out)
    assert [r["id"] for r in written] == [f"row-{e.id}" for e in examples]
    assert [r["label"] for r in written] == [p.label for p in expected]
    for record, prediction in zip(written, expected):
        if out.suffix == ".csv":
            probabilities = [float(record[f"p_{name}"]) for name in prediction.probabilities]
        else:
            probabilities = list(record["probabilities"].values())
        assert probabilities == pytest.approx(list(prediction.probabilities.values()),
                                              abs=1e-5)


def test_regression_scores_and_default_columns(tiny_run, model, tmp_path):
    examples = read_split(model.model.tasks["sts"], "dev", model.config.data_dir)
    source = tmp_path / "sts.tsv"
    write_rows(source, [{"sentence1": e.texts[0], "sentence2": e.texts[1]} for e in examples],
               "tsv")
    out = tmp_path / "scores.tsv"
    assert main(["predict", str(tiny_run), "--task", "sts", "--input", str(source),
                 "--output", str(out)]) == 0
    written = read_output(out)
    expected = model.predict("sts", [e.texts for e in examples])
    assert [r["id"] for r in written] == [str(i) for i in range(len(examples))]  # row numbers
    assert [float(r["score"]) for r in written] == pytest.approx(
        [p.label for p in expected], abs=1e-4)


def test_predict_from_stdin_to_stdout(tiny_run, model):
    examples = read_split(model.model.tasks["quora"], "dev", model.config.data_dir)
    lines = "".join(json.dumps({"qid": e.id, "q1": e.texts[0], "q2": e.texts[1]}) + "\n"
                    for e in examples)
    done = subprocess.run(
        [sys.executable, "-m", "mtbert", "predict", str(tiny_run), "--task", "quora",
         "--input", "-", "--text-columns", "q1", "q2", "--id-column", "qid"],
        input=lines, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = [json.loads(line) for line in done.stdout.splitlines()]
    expected = model.predict("quora", [e.texts for e in examples])
    assert [(r["id"], r["label"]) for r in written] == [
        (e.id, p.label) for e, p in zip(examples, expected)]
    assert f"{len(examples)} rows predicted" in done.stderr


def test_many_rows_are_processed_in_bounded_chunks(model, tmp_path, monkeypatch):
    """The reader is pulled one chunk ahead of the model at most: memory does not grow with
    the file."""
    rows = [{"id": f"r{i}", "sentence": ["good movie", "bad plot here", "fine"][i % 3]}
            for i in range(1000)]
    source = tmp_path / "many.csv"
    write_rows(source, rows, "csv")
    pulled, calls = [0], []
    real_iter, real_outputs = api.iter_examples, api.head_outputs

    def counting_iter(*args, **kwargs):
        for example in real_iter(*args, **kwargs):
            pulled[0] += 1
            yield example

    def recording_outputs(model_, task, split, *args):
        calls.append((pulled[0], len(split)))
        return real_outputs(model_, task, split, *args)

    monkeypatch.setattr(api, "iter_examples", counting_iter)
    monkeypatch.setattr(api, "head_outputs", recording_outputs)
    report = model.predict_file("sst", source, tmp_path / "out.jsonl", chunk_rows=64)
    assert report.rows == 1000 and len(calls) == 16  # ceil(1000 / 64)
    for index, (read_so_far, size) in enumerate(calls, start=1):
        assert size <= 64
        assert read_so_far <= index * 64  # never more than one chunk held
    written = read_output(tmp_path / "out.jsonl")
    assert [r["id"] for r in written] == [r["id"] for r in rows]


def test_malformed_rows_are_reported_with_file_and_line(tiny_run, tmp_path, capsys, caplog):
    source = tmp_path / "rows.csv"
    good = [f"c{i}" for i in range(20)]  # 1 malformed row in 22: under the 5% limit
    source.write_text("id,sentence\na,good movie\nb,\n" + "".join(f"{i},bad plot\n"
                                                                 for i in good),
                      encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(tiny_run), "--task", "sst", "--input", str(source),
                 "--output", str(out)]) == 0
    assert [r["id"] for r in read_output(out)] == ["a", *good]
    assert f"{source}:3: empty 'sentence'" in capsys.readouterr().err
    assert any(f"{source}:3: skipped row" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case, content, arguments, message", [
    ("unknown task", "id,sentence\na,good\n", ["--task", "nli"],
     "unknown task 'nli'; this model's tasks: sst, quora, sts"),
    ("pair task, one column", "id,sentence\na,good\n",
     ["--task", "quora", "--text-columns", "sentence"],
     "task 'quora' takes a pair of texts: two text column"),
    ("missing column", "id,text\na,good\n", ["--task", "sst"],
     "header lacks column(s) 'sentence'"),
    ("empty file", "", ["--task", "sst"], "file is empty"),
    ("header only", "id,sentence\n", ["--task", "sst"], "no data rows"),
    ("output suffix", "id,sentence\na,good\n", ["--task", "sst", "--output", "OUT.txt"],
     "cannot tell the output format"),
])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(tiny_run, tmp_path, capsys, case,
                                                        content, arguments, message):
    source = tmp_path / "in.csv"
    source.write_text(content, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier result\n")
    arguments = [a.replace("OUT.txt", str(tmp_path / "out.txt")) for a in arguments]
    if "--output" not in arguments:
        arguments += ["--output", str(out)]
    assert main(["predict", str(tiny_run), "--input", str(source), *arguments]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("mtbert predict: error: ")]
    assert len(errors) == 1 and message in errors[0], errors
    assert out.read_text() == "an earlier result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.jsonl"]


def test_file_mode_needs_task_and_input(tiny_run, capsys):
    assert main(["predict", str(tiny_run), "--task", "sst"]) == 2
    assert "needs both --task and --input" in capsys.readouterr().err
