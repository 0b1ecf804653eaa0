"""Bad input gets one sentence, exit code 2 and no traceback (issue 21): config values checked
at load time, broken model folders, full disks, files where folders belong, YAML alias bombs,
and fuzzed YAML and data files within bounded time and memory."""

import errno
import json
import resource
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mtbert.checkpoint import file_sha256
from mtbert.cli import main
from mtbert.config import ConfigError, load_config, load_yaml
from mtbert.data.readers import DataError, read_examples
from mtbert.training import train_and_evaluate

from conftest import tiny_config


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1] if err.strip() else ""


TRAIN_CASES = {  # override -> what the one-line error must name
    "train.lr=-1": "train.lr: must be > 0",
    "train.checkpoint_every=0": "train.checkpoint_every: must be >= 1",
    "train.evals_per_epoch=0": "train.evals_per_epoch: must be >= 1",
    "train.epochs=.nan": "train.epochs: expected a finite number",
    "train.epochs=.inf": "train.epochs: expected a finite number",
    "model.max_length=3": "model.max_length: must be >= 8",
    "model.max_length=100000": "model.max_length: 100000 is more than the backbone's 64",
    "tasks.sst.batch_size=0": "tasks[0] (sst).batch_size: must be >= 1",
    "train.max_steps=0": "train.max_steps: must be >= 1",
    "train.warmup_ratio=1": "train.warmup_ratio: must be in [0, 1)",
    "max_skipped_share=2": "max_skipped_share: must be in [0, 1]",
    "tasks.sst.head.dropout=1.5": "tasks[0] (sst).head.dropout: must be in [0, 1)",
}


@pytest.mark.parametrize("override", TRAIN_CASES)
def test_out_of_range_config_values_are_named_before_loading(tmp_path, tiny_backbone,
                                                              tiny_data, capsys, override):
    code, line = run_cli(capsys, "train", "--data-dir", tiny_data, "--run-dir",
                         tmp_path / "run", "tasks=[sst]", f"model.backbone={tiny_backbone}",
                         "model.max_length=32", override)
    assert code == 2
    assert line.startswith("mtbert train: error: ") and TRAIN_CASES[override] in line
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_backbone, tiny_data):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_and_evaluate(tiny_config(tiny_backbone, tiny_data, max_steps=2), run_dir,
                       splits=("dev",))
    return run_dir


def broken_copy(trained_run, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    damage(run_dir / "best")
    return run_dir


def rewrite_manifest_entry(best, name):
    manifest = json.loads((best / "manifest.json").read_text())
    manifest[name] = {"sha256": file_sha256(best / name), "bytes": (best / name).stat().st_size}
    (best / "manifest.json").write_text(json.dumps(manifest))


def wrong_shape(best):
    weights = load_file(best / "model.safetensors")
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[key] = weights[key][:-1].contiguous()
    save_file(weights, best / "model.safetensors")
    rewrite_manifest_entry(best, "model.safetensors")


def without_field(best):
    manifest = json.loads((best / "manifest.json").read_text())
    del manifest["model.safetensors"]["sha256"]
    (best / "manifest.json").write_text(json.dumps(manifest))


MODEL_CASES = {
    "manifest-list": (lambda best: (best / "manifest.json").write_text("[]"),
                      "manifest.json: not a manifest"),
    "manifest-empty": (lambda best: (best / "manifest.json").write_text("{}"),
                       "manifest.json does not list model.safetensors"),
    "manifest-field": (without_field, "manifest.json: not a manifest"),
    "wrong-shape": (wrong_shape, "has shape [24, 32], the model expects [25, 32]"),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_broken_model_folders_are_one_sentence(trained_run, tmp_path, capsys, case):
    damage, message = MODEL_CASES[case]
    run_dir = broken_copy(trained_run, tmp_path, damage)
    code, line = run_cli(capsys, "evaluate", run_dir)
    assert code == 2 and line.startswith("mtbert evaluate: error: ") and message in line, line


def test_predict_out_pointing_at_a_file(trained_run, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    code, line = run_cli(capsys, "predict", trained_run, "--splits", "dev", "--out",
                         tmp_path / "taken")
    assert code == 2 and "mtbert predict: error:" in line and "taken" in line
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


def test_disk_full_while_saving_is_a_sentence(tmp_path, tiny_backbone, tiny_data, capsys,
                                              monkeypatch):
    def full(path, tensors):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("mtbert.training.save_tensors", full)
    monkeypatch.setattr("mtbert.model_folder.save_tensors", full)  # best/ is written there
    code, line = run_cli(capsys, "train", "--data-dir", tiny_data, "--run-dir",
                         tmp_path / "run", "tasks=[sst]", f"model.backbone={tiny_backbone}",
                         "model.max_length=32", "train.max_steps=2")
    assert code == 2 and "run/best: the disk is full" in line
    assert not list((tmp_path / "run").glob(".*.*"))  # no half-written folder left


def test_utf16_data_file_is_a_sentence(tmp_path, tiny_backbone, tiny_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train = data / "ids-sst-train.csv"
    train.write_text(train.read_text(encoding="utf-8"), encoding="utf-16")
    code, line = run_cli(capsys, "train", "--data-dir", data, "--run-dir", tmp_path / "run",
                         "tasks=[sst]", f"model.backbone={tiny_backbone}", "model.max_length=32")
    assert code == 2 and "ids-sst-train.csv: looks UTF-16 encoded" in line


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    code, line = run_cli(capsys, "train", "--resume", tmp_path / "nothing")
    assert code == 2 and "no run there" in line


# ---------------------------------------------------------------- YAML alias bombs


BOMB = textwrap.dedent("""\
    # 30 lines that expand to 9^9 strings
    model:
      conditioning_options:
        a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
        b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
        c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
        d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
        e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
        f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
        g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
        h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
        i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
    tasks: [sst]
    name: *i
    """)


def test_a_yaml_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path):
    """Defect 4: the bomb hung the program with memory growing without bound (formatting the
    error for `name`, or writing the config out). Run apart, under a memory cap."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    script = ("import resource, sys\n"
              f"resource.setrlimit(resource.RLIMIT_AS, ({2 << 30}, {2 << 30}))\n"
              "from mtbert.config import ConfigError, load_config\n"
              "try:\n"
              f"    load_config({str(path)!r})\n"
              "except ConfigError as error:\n"
              "    print(error)\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bomb.yaml: aliases expand to more than 100000 values" in done.stdout
    assert time.monotonic() - start < 30


def test_a_self_referencing_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("tasks: [sst]\nmodel: {conditioning_options: &x {again: *x}}\n")
    with pytest.raises(ConfigError, match="loop.yaml: an alias refers to a value that "
                                          "contains it"):
        load_config(path)


def test_error_messages_show_a_bounded_view_of_a_value(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("tasks: [sst]\nname: [" + ", ".join(["x" * 1000] * 1000) + "]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "name: expected a string" in str(error.value) and len(str(error.value)) < 300


def test_an_oversized_config_file_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="huge.yaml: larger than"):
        load_config(path)


# ---------------------------------------------------------------- fuzz, bounded


def bounded(function, *args, seconds=2.0, megabytes=64):
    """Call `function`; assert it took at most `seconds` and allocated at most `megabytes`."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        return function(*args)
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < seconds and peak < megabytes << 20, (elapsed, peak)


@st.composite
def yaml_documents(draw):
    """YAML text: random text, or nested anchors and aliases of random depth and width."""
    if draw(st.booleans()):
        return draw(st.text(max_size=300))
    depth, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lines = [f"l0: &l0 {draw(st.sampled_from(['x', '[1, 2]', '{a: 1}']))}"]
    for level in range(1, depth):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    lines.append(f"{draw(st.sampled_from(['name', 'tasks', 'train', 'model']))}: *l{depth - 1}")
    return "\n".join(lines) + "\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=yaml_documents())
def test_fuzzed_yaml_loads_or_is_a_config_error(text):
    def load():
        try:
            load_yaml(text, "fuzz.yaml")
        except ConfigError:
            pass

    bounded(load)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode),
       suffix=st.sampled_from([".tsv", ".csv", ".jsonl"]))
def test_fuzzed_data_files_read_or_are_a_data_error(tmp_path, content, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(b"id\tsentence\tsentiment\n" + content)

    def read():
        try:
            read_examples(path, ["sentence"], "sentiment", num_classes=5,
                          max_skipped_share=0.5)
        except DataError:
            pass

    bounded(read)


def test_memory_cap_is_available():  # the bomb test relies on RLIMIT_AS
    assert resource.RLIMIT_AS is not None
