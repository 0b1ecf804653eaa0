"""Each benchmark script's `--smoke` mode runs end to end on the tiny backbone and data."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtbert.training import Trainer

from conftest import WORDS, tiny_config, write_tsv

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def tiny(tiny_backbone, tiny_data):
    return ["--backbone", tiny_backbone, "--data-dir", tiny_data]


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """The cells of the Markdown rows of `out` whose first cell starts with `first_cell`."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {first_cell}")]


def ratio(cell: str) -> float:
    return float(cell.rstrip("x"))


def check_decomposition(out: str, steps: list[str]) -> None:
    """The step rows name `steps` in order, and their printed product is the product of the
    printed step medians (to the rounding of two decimals)."""
    rows = table_rows(out, "(")
    assert [row[0] for row in rows] == steps
    product = ratio(table_rows(out, "product of the steps' medians")[0][2])
    medians = [ratio(row[2]) for row in rows]
    expected = math.prod(medians)
    # each printed median is rounded to +-0.005: a relative error of 0.005 / median, large
    # for a small median (a loaded machine gives smoke runs ratios such as 58x and 0.04x)
    rounding = expected * sum(0.005 / median for median in medians) + 0.005
    assert abs(product - expected) <= rounding * 1.01
    assert table_rows(out, "overall")


def test_bench_train_smoke(tiny):
    pytest.importorskip("transformers")
    out = run("bench_train.py", "--smoke", "--max-length", 32, *tiny)
    contenders = {row[1]: row[0] for row in table_rows(out, "") if len(row) == 7}
    del contenders["name"]  # the header
    assert set(contenders) == {"hf", "hf-plan", "hf-plan-adamw", "mtbert", "mtbert-bf16",
                               "hf-plan-bf16"}
    assert contenders["hf-plan-bf16"].endswith("mtbert AdamW, bf16 autocast")
    assert contenders["hf"].startswith("HF, as commonly run")
    assert contenders["hf-plan"] == "HF, same batch plan, pre-tokenized (torch AdamW)"
    assert "same token ids from HF's tokenizer and mtbert's: yes" in out
    for name in ("hf", "hf-plan", "hf-plan-adamw"):
        assert table_rows(out, f"mtbert / {name} |")
    for bf16_ratio in ("mtbert-bf16 / mtbert |", "mtbert-bf16 / hf-plan-bf16 |",
                       "hf-plan-bf16 / hf-plan-adamw |"):
        assert table_rows(out, bf16_ratio)
    check_decomposition(out, ["(a) batch plan + pre-tokenization",
                              "(b) optimizer: mtbert's AdamW for torch's",
                              "(c) encoder: real tokens only + mtbert's kernels"])
    assert re.search(r"fp32: matmul \d+ GFLOP/s -> limit \d+ tokens/s; reached", out)
    assert "| - |" not in out  # the memory probes filled their columns


def test_bench_train_same_optimizer(tiny):
    """With torch's AdamW on both sides there is no optimizer step to measure."""
    pytest.importorskip("transformers")
    out = run("bench_train.py", "--smoke", "--no-memory", "--optimizer", "torch",
              "--max-length", 32, *tiny)
    assert "| mtbert fp32 (same batch plan, pre-tokenized, torch AdamW) | mtbert |" in out
    assert "hf-plan-adamw" not in out
    assert table_rows(out, "hf-plan-bf16 / hf-plan |")
    check_decomposition(out, ["(a) batch plan + pre-tokenization",
                              "(b) encoder: real tokens only + mtbert's kernels"])


def test_bench_infer_smoke(tiny_backbone, tiny_data, tmp_path):
    pytest.importorskip("transformers")
    # Quora sentences of 1 to 8 words, so that sorting by length reorders every batch
    shutil.copytree(tiny_data, tmp_path, dirs_exist_ok=True)
    sentences = [" ".join(WORDS[i % 7:i % 7 + 1 + (5 * i) % 8]) for i in range(64)]
    write_tsv(tmp_path / "quora-dev.csv", ["id", "sentence1", "sentence2", "is_duplicate"],
              [[f"q{i}", a, b, 0.0] for i, (a, b) in enumerate(zip(sentences, sentences[1:]))])
    out = run("bench_infer.py", "--smoke", "--no-memory", "--max-length", 32,
              "--backbone", tiny_backbone, "--data-dir", tmp_path)
    for contender in ("HF, as commonly run", "HF, same sorted batches", "mtbert fp32",
                      "HF, same sorted batches, weights bf16", "mtbert bf16", "mtbert int8"):
        assert f"| {contender}" in out
    assert re.search(r"mtbert bf16 / HF bf16 on the same sorted batches: \d+\.\d+x", out)
    # the sorted batches reorder rows; the probabilities come back in the texts' order
    gap = re.search(r"max \|hf-sorted - HF\| head probabilities on one batch: (\S+)", out)
    assert float(gap.group(1)) < 1e-5
    check_decomposition(out, [
        "(a) batch plan: length-sorted batches, chunk tokenized at once",
        "(b) encoder: real tokens only + mtbert's kernels"])
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        assert "ONNX skipped" in out
    else:
        assert "| mtbert ONNX Runtime int8 |" in out


def test_bench_infer_accuracy_mode(tiny_backbone, tiny_data, tmp_path):
    Trainer(tiny_config(tiny_backbone, tiny_data, max_steps=2), tmp_path / "run").fit()
    out = run("bench_infer.py", "--accuracy", tmp_path / "run", "--data-dir", tiny_data,
              "--max-examples", 20)
    for task in ("sst", "quora", "sts"):
        assert f"| {task} |" in out
    assert "(n=20)" in out
    assert "largest |difference|" in out


def test_bench_epoch_smoke(tiny):
    out = run("bench_epoch.py", "--smoke", "--profile", 1, *tiny)
    assert "| quantity | fp32 | bf16 |" in out
    assert "| steps per epoch | 6 | 6 |" in out  # 3 tasks x 64 examples, batch 32, proportional
    assert "| real tokens/s |" in out
    assert "bf16 / fp32 real tokens/s" in out
    assert re.search(r"bf16: matmul \d+ GFLOP/s -> limit \d+ tokens/s; reached \d+ = \d+%", out)
    # the profile found matrix products in both precisions and something else beside them
    for precision in ("fp32", "bf16"):
        assert re.search(rf"\| {precision} \| \d+\.\d ms \(\d+%\) \| \d+\.\d ms \| \S", out)
    assert re.search(r"free bf16 matrix products and the rest as it is: at most \d+\.\d\dx", out)


def test_bench_gpu_smoke():
    import torch

    out = run("bench_gpu.py", "--smoke")
    if torch.cuda.is_available():
        assert "| MFU |" in out
    else:
        assert "CUDA is not available" in out


def test_bench_accuracy_smoke_and_resume(tiny, tmp_path):
    pytest.importorskip("transformers")
    out_dir = tmp_path / "accuracy"
    out = run("bench_accuracy.py", "--smoke", "--out", out_dir, *tiny)
    tasks = ("sst", "quora", "sts")
    for rule in ("last step", "dev-selected (optimistic)"):
        assert f"checkpoint rule: {rule}" in out
    for row in ("(a1) HF [CLS] pooler head", "(a2) HF mean pooling + linear head",
                "(b) mtbert single-task, same recipe, 3 models",
                "(c) mtbert, one multitask model", "(c) - (a1)", "(c) - (a2)", "(c) - (b)"):
        assert f"| {row}" in out
    results = json.loads((out_dir / "results.json").read_text())
    assert {f"{kind}/{task}" for kind in ("hf-cls", "hf-mean", "mtbert-only")
            for task in tasks} | {"mtbert"} <= set(results)
    for task in tasks:
        for pooling in ("cls", "mean"):
            hf = results[f"hf-{pooling}/{task}"]
            assert hf["steps"] == 1 and hf["epoch_scores"] == [hf["last"]]
        alone = results[f"mtbert-only/{task}"]
        assert set(alone["last"]) == set(alone["best"]) == {task}
    # mean pooling and the [CLS] head are different models: their heads differ in size
    assert results["hf-mean/sst"]["parameters"] != results["hf-cls/sst"]["parameters"]
    # one stored encoder against three
    ratio = results["mtbert"]["parameters"] / sum(
        results[f"hf-cls/{task}"]["parameters"] for task in tasks)
    assert ratio < 0.5
    assert (out_dir / "mtbert" / "predictions" / "sst-dev-output.csv").is_file()
    # each side's precision is named, mtbert's as its run recorded it
    precision = json.loads((out_dir / "mtbert" / "run.json").read_text())["precision"]
    assert f"precision {precision} (run.json)" in out
    assert "(a) trains in fp32" in out
    # a second run finds every result and trains nothing: the same tables come back
    again = run("bench_accuracy.py", "--smoke", "--out", out_dir, *tiny)
    assert again.split("\n\n", 1)[1] == out.split("\n\n", 1)[1]
    assert json.loads((out_dir / "results.json").read_text()) == results


def test_bench_infer_predict_cli_mode(tiny_run, tiny_data):
    out = run("bench_infer.py", "--predict-cli", tiny_run, "--data-dir", tiny_data,
              "--repeats", 1, "--batch-size", 8)
    assert "| mtbert predict (Model.predict_file" in out
    assert "| mtbert fp32 (sorted, dynamic padding), same encoder" in out
    assert "32 pairs = 64 sentences" in out and "mtbert predict / fp32 path:" in out


def test_bench_serve_smoke(tiny_run):
    """Three real servers (mtbert fp32, int8, naive transformers) under a few requests."""
    pytest.importorskip("transformers")
    pytest.importorskip("uvicorn")
    out = run("bench_serve.py", tiny_run, "--smoke")
    assert "max |probability difference|" in out
    for server in ("mtbert serve fp32", "mtbert serve int8", "naive transformers (thread pool)"):
        for concurrency in (1, 4):
            assert re.search(rf"\| {re.escape(server)} \| {concurrency} \| 20 \| 0 \|", out), out
    assert "errors over the run: 0" in out


def test_bench_moe_smoke(tiny):
    out = run("bench_moe.py", "--smoke", "--max-length", 32, "--every", 1, *tiny)
    for contender in ("dense", "MoE top-1", "MoE top-2"):
        assert f"| {contender} |" in out
    assert "MoE top-1 / dense training tokens/s per repeat" in out


def test_bench_data_smoke(tiny_backbone, tmp_path):
    out = run("bench_data.py", "--smoke", "--backbone", tiny_backbone, "--work", tmp_path,
              "--max-length", 32)
    rows = {row[1]: row for row in table_rows(out, "")}
    assert rows["mtbert in memory (before)"][0].startswith("2,000")
    assert float(rows["mtbert in memory (before)"][2].replace(",", "")) > 0  # rows/s
    assert float(rows["mtbert token cache"][4]) > 0  # a warm first step was taken


def test_compare_readings_lists_what_a_change_of_rules_changed(tmp_path):
    """Two versions of an ablation table: the compute of each row in both, and each
    difference whose reading (above, below, tie) differs; a row only in one is left out."""
    before = ("| Model configuration | Δ overall vs base [95% CI] | Δm% vs single-task [95% CI] "
              "| Steps / examples seen |\n|---|---:|---:|---:|\n"
              "| base | – | -1.62 [-4.00, +0.76] tie | 600 / sst 19k |\n"
              "| base-only-sst | – | – | 534 / sst 17k |\n"
              "| dwa ⚠ same first-step losses as the baseline | +0.000 [-0.001, +0.001] tie "
              "| -1.62 [-3.91, +0.67] tie | 600 / sst 19k |\n"
              "| gone | +0.010 [+0.001, +0.020] | +1.00 [+0.50, +1.50] | 600 / sst 19k |\n\n"
              "| Model configuration | sst vs alone (points) |\n|---|---:|\n"
              "| base | -1.33 [-4.34, +1.67] tie |\n| dwa | -1.58 [-2.83, -0.34] |\n")
    after = before.replace("534 / sst 17k", "600 / sst 19k").replace(
        "-1.62 [-4.00, +0.76] tie", "-2.10 [-3.00, -1.20]").replace(
        "-1.58 [-2.83, -0.34]", "+0.20 [-0.50, +0.90] tie").replace(
        "| gone |", "| new |")
    (tmp_path / "before.md").write_text(before)
    (tmp_path / "after.md").write_text(after)
    out = run("compare_readings.py", tmp_path / "before.md", tmp_path / "after.md")
    assert table_rows(out, "base-only-sst") == [["base-only-sst", "534 / sst 17k",
                                                 "600 / sst 19k"]]
    changes = [row for row in table_rows(out, "base |") + table_rows(out, "dwa |")
               if len(row) == 5]  # the readings table's rows (the compute table has 3 cells)
    assert [row[1:] for row in changes] == [
        ["Δm% vs single-task [95% CI]", "-1.62 [-4.00, +0.76] tie", "-2.10 [-3.00, -1.20]",
         "tie → below"],
        ["sst vs alone (points)", "-1.58 [-2.83, -0.34]", "+0.20 [-0.50, +0.90] tie",
         "below → tie"]]
    assert "2 reading(s) changed over 3 rows in both tables." in out
    assert not table_rows(out, "gone") and not table_rows(out, "new")
    # A second ablation in the same file (the results docs hold several) is not read.
    (tmp_path / "after.md").write_text(after + "\n## Another budget\n\n" + before)
    assert run("compare_readings.py", tmp_path / "before.md", tmp_path / "after.md") == out
