"""A technique from outside mtbert (issue 20): the Python blocks of docs/extending.md define and
register a weighting, a combiner, a head, a loss and a conditioning variant with no edit under
src/, and each trains two steps; entry points register too."""

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mtbert.config import ConfigError
from mtbert.registry import registry
from mtbert.training import Trainer

from conftest import tiny_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
REGISTERED = {"weighting": "log", "combiner": "clipped_sum", "head": "bilinear",
              "loss": "focal", "conditioning": "scaled_input"}
USES = {  # overrides that put each one to work
    "weighting": ["train.weighting=log"],
    "combiner": ["train.combiner=clipped_sum"],
    "head": ["tasks.quora.head.type=bilinear", "tasks.sts.head.type=bilinear"],
    "loss": ["tasks.sst.loss=focal", "tasks.sst.loss_options={gamma: 1.0}"],
    "conditioning": ["model.conditioning=scaled_input"],
}


@pytest.fixture(scope="module")
def doc_techniques():
    """Run the page's Python blocks; unregister what they registered afterwards."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 5
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)  # noqa: S102 - our docs
    yield namespace
    for kind, name in REGISTERED.items():
        registry(kind).unregister(name)


@pytest.mark.parametrize("kind", REGISTERED)
def test_a_documented_technique_trains_two_steps(kind, doc_techniques, tiny_backbone,
                                                 tiny_data, tmp_path):
    config = tiny_config(tiny_backbone, tiny_data, *USES[kind], max_steps=2)
    trainer = Trainer(config, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.state.step == 2 and trainer.state.skipped_steps == 0
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.state.history and all(
        value == value for value in trainer.state.history[-1]["dev"].values())  # no NaN
    if kind == "conditioning":
        assert type(trainer.model.conditioning).__name__ == "TaskScaledInput"
    if kind == "head":
        assert type(trainer.model.heads["sts"]).__name__ == "BilinearHead"


def test_an_unregistered_name_lists_the_registered_ones(doc_techniques, tiny_backbone,
                                                        tiny_data):
    with pytest.raises(ConfigError, match="train.weighting: unknown 'nope'; registered: "
                                          "dwa, gradnorm, log, static, sum, uncertainty"):
        tiny_config(tiny_backbone, tiny_data, "train.weighting=nope")


def test_a_taken_name_needs_replace(doc_techniques):
    with pytest.raises(ValueError, match="already registered"):
        registry("weighting").register("sum", doc_techniques["LogLossWeighting"])


def test_an_entry_point_registers_a_technique(tmp_path, monkeypatch, tiny_backbone, tiny_data):
    """A package's `[project.entry-points."mtbert.weightings"]` is found without a call."""
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent("""
        from mtbert.balancing import SumWeighting

        class HalfWeighting(SumWeighting):
            def forward(self, losses, last_shared):
                return {name: 0.5 * loss for name, loss in losses.items()}
        """))
    info = tmp_path / "my_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mtbert.weightings]\nhalf = my_plugin:HalfWeighting\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    weightings = registry("weighting")
    monkeypatch.setattr(weightings, "_plugins_loaded", False)
    try:
        config = tiny_config(tiny_backbone, tiny_data, "train.weighting=half", max_steps=2)
        assert type(Trainer(config, tmp_path / "run").weighting).__name__ == "HalfWeighting"
    finally:
        weightings.unregister("half")
        sys.modules.pop("my_plugin", None)
