"""GLUE's small tasks: presets that read the official files as they are, GLUE's metrics and
score, `predict` on an official-format file, and the Hugging Face anchor's smoke run."""

import csv
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mtbert.cli import main
from mtbert.config import ConfigError, TaskConfig, load_config
from mtbert.data.readers import read_examples
from mtbert.data.tasks import read_split
from mtbert.evaluation import format_table, metric, overall_score, task_scores
from mtbert.experiments.ablation import columns
from mtbert.metrics import METRICS
from mtbert.presets import PRESETS
from mtbert.techniques import check_techniques

from conftest import WORDS, tiny_config

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
# Rows of the train / dev files in ../shared/data/glue (its README).
OFFICIAL_ROWS = {"cola": (7508, 1043), "mrpc": (3260, 408), "rte": (2213, 277),
                 "stsb": (4887, 862), "wnli": (564, 71), "sst2": (66477, 872)}
TRAIN_ROWS, DEV_ROWS = 16, 8
# A sentence opening with a stray quote: under CSV quoting it would open a quoted field that
# never closes (the official MRPC, STS-B and CoLA files hold such lines).
STRAY = '"the film'


def preset(name: str) -> TaskConfig:
    return TaskConfig(name=name, **PRESETS[name])


def _glue_lines(task: str, n: int, rng: random.Random) -> list[str]:
    """`n` rows of `task` in its official layout; the first row's first text holds a stray
    quote."""
    def text(i, k=0):
        words = " ".join(rng.choice(WORDS) for _ in range(4))
        return f"{STRAY} {words}" if i == 0 and k == 0 else words

    if task == "cola":  # no header; source, label, original mark, sentence
        return [f"gj04\t{i % 2}\t{'' if i % 2 else '*'}\t{text(i)}" for i in range(n)]
    if task == "mrpc":  # header with a byte-order mark
        return (["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
                + [f"{i % 2}\t{100 + i}\t{200 + i}\t{text(i)}\t{text(i, 1)}" for i in range(n)])
    if task == "stsb":  # 10 columns
        return (["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                 "sentence2\tscore"]
                + [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{text(i)}\t"
                   f"{text(i, 1)}\t{i % 6:.3f}" for i in range(n)])
    if task in ("rte", "wnli"):
        labels = ["entailment", "not_entailment"] if task == "rte" else ["1", "0"]
        return (["index\tsentence1\tsentence2\tlabel"]
                + [f"{i}\t{text(i)}\t{text(i, 1)}\t{labels[i % 2]}" for i in range(n)])
    return ["sentence\tlabel"] + [f"{text(i)} \t{i % 2}" for i in range(n)]  # sst2


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """Tiny files in each official GLUE layout, in ../shared/data/glue's folders."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("glue")
    for name in OFFICIAL_ROWS:
        folder = root / Path(PRESETS[name]["train_file"]).parent
        folder.mkdir(exist_ok=True)
        for split, rows in (("train", TRAIN_ROWS), ("dev", DEV_ROWS)):
            (folder / f"{split}.tsv").write_text("\n".join(_glue_lines(name, rows, rng)) + "\n",
                                                 encoding="utf-8")
    return root


# ---------------------------------------------------------------- reading the official layouts


@pytest.mark.parametrize("name", list(OFFICIAL_ROWS))
def test_each_preset_reads_its_layout_with_a_stray_quote(glue_dir, name):
    task = preset(name)
    train = read_split(task, "train", glue_dir, strict=True)  # strict: no row skipped
    dev = read_split(task, "dev", glue_dir, strict=True)
    assert (len(train), len(dev)) == (TRAIN_ROWS, DEV_ROWS)
    assert train[0].texts[0].startswith(STRAY)
    assert len(train[0].texts) == (1 if name in ("cola", "sst2") else 2)
    expected = [float(i % 6) if name == "stsb" else float(i % 2) for i in range(TRAIN_ROWS)]
    if name == "wnli":  # labels "1", "0", "1", ...
        expected = [float(1 - i % 2) for i in range(TRAIN_ROWS)]
    assert [e.label for e in train] == expected


def test_default_quoting_cannot_read_an_official_file(glue_dir):
    """Why `quoting: none` exists: read with CSV quoting, the stray quote's row is lost."""
    task = preset("mrpc")
    report = read_examples(glue_dir / task.train_file, task.text_columns, task.label_column)
    assert len(report.examples) < TRAIN_ROWS and report.skipped


@pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"GLUE data not found at {GLUE_DIR}")
@pytest.mark.parametrize("name", list(OFFICIAL_ROWS))
def test_each_preset_reads_the_official_files_whole(name):
    task = preset(name)
    for split, rows in zip(("train", "dev"), OFFICIAL_ROWS[name]):
        path = GLUE_DIR / getattr(task, f"{split}_file")
        report = read_examples(path, task.text_columns, task.label_column,
                               id_column=task.id_column, num_classes=task.num_classes,
                               label_range=task.label_range and tuple(task.label_range),
                               label_names=task.label_names or (), quoting=task.quoting,
                               columns=task.columns)
        assert (len(report.examples), report.skipped) == (rows, [])
        assert len(read_split(task, split, GLUE_DIR, strict=True)) == rows


def test_a_user_task_names_the_fields_of_a_header_less_file(tmp_path):
    path = tmp_path / "plain.tsv"
    path.write_text('a\tit said "no\t1\nb\tfine\t0\n', encoding="utf-8")
    report = read_examples(path, ["text"], "gold", columns=["key", "text", "gold"],
                           id_column="key", quoting="none")
    assert [(e.id, e.texts, e.label) for e in report.examples] == [
        ("a", ('it said "no',), 1.0), ("b", ("fine",), 0.0)]


def test_label_names_read_as_their_index_and_unknown_names_are_malformed(tmp_path):
    path = tmp_path / "nli.tsv"
    path.write_text("text\tlabel\nx\tno\ny\tyes\nz\tmaybe\n", encoding="utf-8")
    report = read_examples(path, ["text"], "label", label_names=["no", "yes"])
    assert [e.label for e in report.examples] == [0.0, 1.0]
    assert report.skipped == [(4, "'label' value 'maybe' is not a number nor one of the "
                                  "label names ['no', 'yes']")]


def test_columns_must_name_the_text_and_label_columns(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(t\)\.columns: .* lacks 'label'"):
        load_config(None, ["tasks=[{name: t, train_file: x.tsv, columns: [id, sentence], "
                           "label_column: label, num_classes: 2}]"])


# ---------------------------------------------------------------- metrics


def test_matthews_correlation_by_hand():
    # TP 3, TN 2, FP 1, FN 2: (3*2 - 1*2) / sqrt(4 * 5 * 3 * 4) = 4 / sqrt(240)
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    predictions = np.array([1, 1, 1, 0, 0, 1, 0, 0])
    assert METRICS["matthews"].function(predictions, labels) == pytest.approx(4 / 240 ** 0.5)
    assert METRICS["matthews"].function(np.ones(8), labels) == 0.0  # one class predicted


def test_f1_by_hand():
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    predictions = np.array([1, 1, 1, 0, 0, 1, 0, 0])
    # precision 3/4, recall 3/5: F1 = 2 * 3 / (4 + 5)
    assert METRICS["f1"].function(predictions, labels) == pytest.approx(6 / 9)
    assert METRICS["f1"].function(np.zeros(8), labels) == 0.0


def test_spearman_with_ties_by_hand():
    # Ranks with ties at their mean: x -> 1, 2.5, 2.5, 4; y -> 1, 2, 3, 4. Deviations from
    # the mean rank 2.5: x (-1.5, 0, 0, 1.5), y (-1.5, -0.5, 0.5, 1.5). Pearson of the ranks:
    # 4.5 / sqrt(4.5 * 5); ranking the tie as 2, 3 would give 1.0.
    x, y = np.array([1.0, 2.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0, 40.0])
    assert METRICS["spearman"].function(x, y) == pytest.approx(4.5 / 22.5 ** 0.5)


def test_a_task_with_two_metrics_scores_their_mean_and_reports_each():
    mrpc = preset("mrpc")
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    predictions = np.array([1, 1, 1, 0, 0, 1, 0, 0])
    scores = task_scores(mrpc, predictions, labels)
    assert scores == pytest.approx({"mrpc": (6 / 9 + 5 / 8) / 2, "mrpc/f1": 6 / 9,
                                    "mrpc/accuracy": 5 / 8})
    assert metric(mrpc, predictions, labels) == scores["mrpc"]
    table = format_table({"dev": {**scores, "overall": 0.5}}, {"mrpc": mrpc})
    assert "mrpc f1 | mrpc accuracy | mrpc mean(f1, accuracy)" in table
    assert "| 0.667 | 0.625 | 0.646 |" in table


def test_glue_score_is_the_plain_mean_and_the_cs224n_overall_is_unchanged():
    glue = {n: preset(n) for n in ("cola", "mrpc", "stsb")}
    scores = {"cola": 0.4, "mrpc": 0.8, "mrpc/f1": 0.9, "stsb": 0.6}
    assert overall_score(glue, scores, how="mean") == pytest.approx((0.4 + 0.8 + 0.6) / 3)
    assert overall_score(glue, scores) == pytest.approx((1.4 / 2 + 0.8 + 1.6 / 2) / 3)
    cs224n = {n: preset(n) for n in ("sst", "quora", "sts")}
    scores = {"sst": 0.5, "quora": 0.8, "sts": 0.6}
    assert overall_score(cs224n, scores) == (0.5 + 0.8 + (0.6 + 1) / 2) / 3


@pytest.mark.parametrize("metric_setting, error", [
    ("pearson", "'pearson' scores regression tasks, not this classification task"),
    ("[accuracy, matthews]", "must share a range"),
    ("kappa", "unknown 'kappa'"),
])
def test_metrics_are_checked_against_the_task(metric_setting, error):
    config = load_config(None, ["tasks=[cola]", f"tasks.cola.metric={metric_setting}"])
    with pytest.raises(ConfigError, match=error):  # names against the registry: at build time
        check_techniques(config)


def test_ablation_tables_show_each_metric_and_the_task_score():
    results = {"glue": [{"tasks": {"mrpc": {"metric": ["f1", "accuracy"], "preset": "mrpc"},
                                   "cola": {"metric": "matthews", "preset": "cola"}}}]}
    assert [(c.task, c.header) for c in columns(results)] == [
        ("mrpc/f1", "MRPC Dev F1"), ("mrpc/accuracy", "MRPC Dev Acc"), ("mrpc", "MRPC Dev mean"),
        ("cola", "CoLA Dev MCC"), ("overall", "Overall Dev")]


# ---------------------------------------------------------------- training, predict, configs


@pytest.mark.parametrize("config", ["small-tasks.yaml", "with-sst2.yaml"])
def test_glue_configs_load(config):
    loaded = load_config(Path(__file__).resolve().parents[1] / "configs" / "glue" / config)
    assert loaded.overall_score == "mean"
    assert {"cola", "mrpc", "rte", "stsb"} <= {t.name for t in loaded.tasks}


@pytest.fixture(scope="module")
def glue_run(tiny_backbone, glue_dir, tmp_path_factory) -> Path:
    from mtbert.training import train_and_evaluate

    run = tmp_path_factory.mktemp("glue-run") / "run"
    config = tiny_config(tiny_backbone, glue_dir, "overall_score=mean",
                         "adapt.keep_task_best=true", tasks="[cola, mrpc, rte, stsb]",
                         max_steps=4)
    train_and_evaluate(config, run)
    return run


def test_training_selects_on_the_glue_score_and_logs_each_metric(glue_run):
    record = json.loads((glue_run / "metrics.jsonl").read_text().splitlines()[-1])["dev"]
    assert {"mrpc/f1", "mrpc/accuracy", "stsb/pearson", "stsb/spearman"} <= record.keys()
    assert record["mrpc"] == pytest.approx((record["mrpc/f1"] + record["mrpc/accuracy"]) / 2)
    tasks = ("cola", "mrpc", "rte", "stsb")
    assert record["overall"] == pytest.approx(np.mean([record[t] for t in tasks]))
    assert sorted(p.name for p in (glue_run / "best-tasks").iterdir()) == sorted(tasks)
    assert not (glue_run / "best-tasks" / "mrpc" / "f1").exists()  # a metric, not a task


@pytest.mark.parametrize("task, labels", [("cola", {"0", "1"}),
                                          ("rte", {"entailment", "not_entailment"})])
def test_predict_an_official_file_one_row_per_line_in_order(glue_run, glue_dir, tmp_path,
                                                            task, labels):
    source = glue_dir / PRESETS[task]["dev_file"]
    out = tmp_path / "out.csv"
    assert main(["predict", str(glue_run), "--task", task, "--input", str(source),
                 "--output", str(out)]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # CoLA has no id column: ids are the row numbers; RTE's are its `index` column.
    assert [r["id"] for r in rows] == [str(i) for i in range(DEV_ROWS)]
    assert {r["label"] for r in rows} <= labels


def test_bench_glue_hf_smoke(tiny_backbone, glue_dir, tmp_path):
    pytest.importorskip("transformers")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_glue_hf.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tasks", "cola", "mrpc", "stsb", "wnli", "--seeds",
         "1", "2", "--max-steps", "1", "--limit", "8", "--max-length", "32",
         "--backbone", str(tiny_backbone), "--data-dir", str(glue_dir), "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "`python benchmarks/bench_glue_hf.py --tasks cola mrpc stsb wnli" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "CoLA", "MRPC", "STS-B", "WNLI", "GLUE score (CoLA, MRPC, STS-B)"]
    assert "F1" in rows[2] and "Spearman" in rows[3]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"cola/1", "cola/2", "wnli/2"} <= results.keys()
    assert results["mrpc/1"]["steps"] == 1

    # --beside: an ablation's one model against its single-task rows (paired by seed) and these
    # models; the trained results are reused, nothing is trained again.
    ablation = tmp_path / "ablation"
    ablation.mkdir()
    write_rows(ablation / "results.csv", ["config", "single_task_of"], [
        ["glue", ""], ["glue-ema", ""], ["glue-only-cola", "glue"], ["glue-only-mrpc", "glue"],
        ["glue-only-stsb", "glue"]])
    write_rows(ablation / "results-per-seed.csv",
               ["config", "seed_index", "examples_cola", "examples_mrpc", "examples_stsb",
                "cola", "mrpc/f1", "mrpc", "stsb", "overall"], [
                   ["glue", 0, 9, 9, 9, 0.30, 0.9, 0.80, 0.86, 0.65],
                   ["glue", 1, 9, 9, 9, 0.34, 0.9, 0.82, 0.88, 0.68],
                   ["glue-ema", 0, 9, 9, 9, 0.31, 0.9, 0.81, 0.90, 0.67],
                   ["glue-ema", 1, 9, 9, 9, 0.33, 0.9, 0.81, 0.92, 0.69],
                   ["glue-only-cola", 0, 9, "", "", 0.28, "", "", "", 0.28],
                   ["glue-only-cola", 1, 9, "", "", 0.30, "", "", "", 0.30],
                   ["glue-only-mrpc", 0, "", 9, "", "", 0.9, 0.81, "", 0.81],
                   ["glue-only-mrpc", 1, "", 9, "", "", 0.9, 0.80, "", 0.80],
                   ["glue-only-stsb", 0, "", "", 9, "", "", "", 0.85, 0.85],
                   ["glue-only-stsb", 1, "", "", 9, "", "", "", 0.87, 0.87]])
    done = subprocess.run(
        [sys.executable, str(script), "--tasks", "cola", "mrpc", "stsb", "wnli", "--seeds",
         "1", "2", "--max-steps", "1", "--limit", "8", "--max-length", "32",
         "--backbone", str(tiny_backbone), "--data-dir", str(glue_dir), "--out",
         str(tmp_path), "--beside", str(ablation)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HF cola" not in done.stderr  # reused
    goal = {tuple(c.strip() for c in r.split("|")[1:3]): [c.strip() for c in r.split("|")[3:-1]]
            for r in done.stdout.split("One model against each task alone")[1].splitlines()
            if r.startswith("| ")}
    # A block per multitask row, the baseline first, each against the same single-task rows.
    assert [key for key in goal if key[1] == "CoLA"] == [("glue", "CoLA"), ("glue-ema", "CoLA")]
    assert goal["glue", "CoLA"][:2] == ["32.0 ± 2.8", "29.0 ± 1.4"]
    # Paired by seed: +2 and +4 points, mean +3, t(0.975, 1) * std / sqrt(2) = 12.706 * 1.
    assert goal["glue", "CoLA"][3] == "+3.00 [-9.71, +15.71] tie"
    assert goal["glue", "MRPC"][3] == "+0.50 [-18.56, +19.56] tie"  # -1 and +2 points
    assert goal["glue-ema", "STS-B"][3] == "+5.00 [+5.00, +5.00]"  # +5 points on both seeds
    hf_cola = [results[f"cola/{seed}"]["scores"]["cola"] * 100 for seed in (1, 2)]
    assert goal["glue", "CoLA"][4].startswith(f"{32 - np.mean(hf_cola):+.2f}")
    # The GLUE score of the single-task side is the mean of its task scores, seed by seed.
    glue_score = "GLUE score (CoLA, MRPC, STS-B)"
    assert goal["glue", glue_score][:2] == ["66.5 ± 2.1", "65.2 ± 0.7"]
    assert goal["glue-ema", glue_score][:2] == ["68.0 ± 1.4", "65.2 ± 0.7"]


def test_welch_interval_equals_a_hand_computation(monkeypatch):
    from scipy import stats

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_glue_hf import welch_interval

    # a: mean 0.2, variance 0.01; b: mean 0.3, variance 0.02. Standard error sqrt(0.01 / 3 +
    # 0.02 / 2) = 0.11547; Welch-Satterthwaite df = 0.013333^2 / (0.003333^2 / 2 + 0.01^2 / 1)
    # = 1.68421.
    interval = welch_interval([0.1, 0.2, 0.3], [0.2, 0.4])
    half = stats.t.ppf(0.975, 1.68421) * 0.115470
    assert interval.mean == pytest.approx(-0.1)
    assert (interval.low, interval.high) == pytest.approx((-0.1 - half, -0.1 + half), abs=1e-5)
    assert interval.tie
    assert welch_interval([0.5, 0.5], [0.4, 0.4]).format(digits=1) == "+0.1 [+0.1, +0.1]"


def write_rows(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])


def test_report_shows_each_metric_and_the_task_score(glue_run):
    from mtbert.experiments.report import write_report

    page = write_report(glue_run).read_text(encoding="utf-8")
    assert "<td>mrpc</td><td>mean(f1, accuracy)</td>" in page
    assert "<td>mrpc</td><td>f1</td>" in page
    assert re.search(r"dev examples; pearson -?\d\.\d{4}, spearman -?\d\.\d{4}", page)


def test_model_card_lists_each_metric_of_a_task():
    from mtbert.export import model_card

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "glue"
                         / "small-tasks.yaml")
    dev = {"cola": 0.4, "mrpc": 0.8, "mrpc/f1": 0.85, "mrpc/accuracy": 0.75, "overall": 0.6}
    card = model_card(config, {"dev": dev, "step": 3}, "hf", "out")
    front = yaml.safe_load(card.split("---")[1])
    found = {r["task"]["name"]: r["metrics"] for r in front["model-index"][0]["results"]}
    assert found == {"cola": [{"type": "matthews", "value": 0.4, "name": "dev matthews"}],
                     "mrpc": [{"type": "f1", "value": 0.85, "name": "dev f1"},
                              {"type": "accuracy", "value": 0.75, "name": "dev accuracy"}]}
    assert "as they are (the GLUE score)" in card


def test_data_check_verifies_the_folders_sha256sums_and_names_glue_files_by_path(
        glue_dir, tmp_path, capsys):
    import hashlib
    import shutil

    folder = tmp_path / "glue"
    shutil.copytree(glue_dir, folder)
    files = ["CoLA/train.tsv", "CoLA/dev.tsv", "RTE/train.tsv", "RTE/dev.tsv"]
    sums = [f"{hashlib.sha256((folder / f).read_bytes()).hexdigest()}  {f}" for f in files]
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    assert main(["data", "check", str(folder), "--tasks", "cola", "rte", "mrpc"]) == 0
    out = capsys.readouterr().out
    assert f"ok    CoLA/train.tsv: {TRAIN_ROWS} rows, 0 malformed; sha256 as in SHA256SUMS" in out
    assert f"ok    RTE/dev.tsv: {DEV_ROWS} rows, 0 malformed; sha256 as in SHA256SUMS" in out
    assert f"ok    MRPC/train.tsv: {TRAIN_ROWS} rows, 0 malformed\n" in out  # not listed

    # A row repeated: the file still reads, but it is not the file the folder lists.
    damaged = folder / "RTE" / "train.tsv"
    data = damaged.read_bytes()
    damaged.write_bytes(data + data.splitlines(keepends=True)[-1])
    assert main(["data", "check", str(folder), "--tasks", "cola", "rte"]) == 2
    captured = capsys.readouterr()
    listed = folder / "SHA256SUMS"
    assert f"ERROR {damaged}: sha256 differs from its sum in {listed}" in captured.out
    assert "1 of 4 task files are missing or unreadable" in captured.err

    (folder / "SHA256SUMS").write_text(sums[0] + "\nnot a sum line\n")
    assert main(["data", "check", str(folder), "--tasks", "cola"]) == 2
    assert f"{folder / 'SHA256SUMS'}:2: not a sha256sum line" in capsys.readouterr().err


def test_data_check_verifies_the_shared_glue_folder(data_dir, capsys):
    glue = data_dir / "glue"
    if not (glue / "SHA256SUMS").is_file():
        pytest.skip(f"no GLUE folder with SHA256SUMS at {glue}")
    assert main(["data", "check", str(glue), "--tasks", "cola", "mrpc", "rte", "stsb",
                 "wnli"]) == 0
    out = capsys.readouterr().out
    for name, folder in (("cola", "CoLA"), ("mrpc", "MRPC"), ("rte", "RTE"), ("stsb", "STS-B"),
                         ("wnli", "WNLI")):
        train, dev = OFFICIAL_ROWS[name]
        assert (f"ok    {folder}/train.tsv: {train} rows, 0 malformed; sha256 as in "
                "SHA256SUMS") in out
        assert f"ok    {folder}/dev.tsv: {dev} rows, 0 malformed; sha256 as in SHA256SUMS" in out
