"""The composition matrix (issue 36): every pair of features (tests/composition.py) trains
with every trainable parameter and auxiliary term getting a gradient, resumes bit-identically
and is merged, exported and served, or is refused in one line naming both; the table in
docs/architecture.md is what these tests found."""

import json
import os
import subprocess
import sys

import pytest
import torch
from composition import (
    DOCS,
    FEATURES,
    PAIRS,
    TECHNIQUES,
    TESTS,
    Outcome,
    Refused,
    Setup,
    act,
    one_key,
    replace_section,
    table,
    train_checked,
)

OUTCOMES: dict[tuple[str, str], Outcome] = {}  # what each cell found, for the table


@pytest.fixture(scope="module")
def setup(tiny_backbone, tiny_data, tmp_path_factory):
    """One thread: the tiny model's operations are too small to share, and on a loaded
    machine threads waiting for each other made each cell ten times slower."""
    setup = Setup(tiny_backbone, tiny_data, tmp_path_factory.mktemp("composition"))
    setup.write_teacher()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield setup
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_processes(setup) -> dict[str, dict]:
    """Every technique's run, the plain run, a task added and a task fine-tuned, each
    trained, checked and resumed on 2 processes: one torchrun job."""
    spec = setup.work / "ddp-spec.json"
    spec.write_text(json.dumps({"backbone": str(setup.backbone), "data": str(setup.data),
                                "work": str(setup.work),
                                "techniques": ["", "add_task", "finetune", *TECHNIQUES]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           str(TESTS / "composition_worker.py"), str(spec)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((setup.work / "ddp-results.json").read_text())


def check_pair(setup: Setup, a: str, b: str, request) -> str:
    """What the cell (a, b) verified; `Refused` where the pair is refused."""
    first, second = FEATURES[a], FEATURES[b]
    if not first.action and not second.action:
        return train_checked(setup.config((a, b)), setup.work / f"pair-{a}-{b}", [a, b])
    if "processes" in (a, b):
        other = a if b == "processes" else b
        result = request.getfixturevalue("two_processes")[
            other if other in (*TECHNIQUES, "add_task", "finetune") else ""]
        if "error" in result:
            pytest.fail(result["error"])
        if "refused" in result:
            raise Refused(result["refused"])
        checked = f"2 processes: {result['checked']}"
        if other in ("merge", "export", "serve"):
            checked += "; " + act(setup, other, setup.work / "ddp-base", (), (a, b))[1]
        return checked
    if not first.action:
        return act(setup, b, setup.run((a,)), (a,), (a, b))[1]
    run, said = setup.run(), []
    for action in (a, b):
        run, checked = act(setup, action, run, (), (a, b))
        said.append(checked)
    return "; then ".join(said)


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_pair_composes_or_is_refused_naming_both(a, b, setup, request):
    if one_key(a, b):
        pytest.skip(f"one setting: {', '.join(sorted(one_key(a, b)))}")
    try:
        OUTCOMES[(a, b)] = Outcome(checked=check_pair(setup, a, b, request))
    except Refused as refused:
        OUTCOMES[(a, b)] = Outcome(refused=str(refused))


def test_docs_show_the_matrix_these_tests_found():
    """Runs after the cells; `python tests/composition.py` rewrites the table instead."""
    missing = [pair for pair in PAIRS if pair not in OUTCOMES and not one_key(*pair)]
    if missing:
        pytest.skip(f"{len(missing)} cells did not run or failed, e.g. {missing[0]}")
    text = DOCS.read_text(encoding="utf-8")
    expected = replace_section(text, table(OUTCOMES))
    if os.environ.get("MTBERT_WRITE_MATRIX"):
        DOCS.write_text(expected, encoding="utf-8")
        return
    assert text == expected, "docs/architecture.md: run python tests/composition.py"
