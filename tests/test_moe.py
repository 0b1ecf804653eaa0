"""Mixture-of-experts FFNs: upcycling, routing arithmetic by hand, dispatch against a per-token
loop, Task-MoE extraction, and a tiny run that trains, logs, saves, reloads and resumes."""

import copy
import json
import math
import re

import pytest
import torch

from mtbert.auxiliary import SideOutputs
from mtbert.config import ConfigError, MoEConfig
from mtbert.experiments.report import write_report
from mtbert.model.bert import BertConfig, BertModel, ChainedHooks
from mtbert.model.moe import (
    MixtureOfExperts,
    expert_capacity,
    extract_task_encoder,
    load_balancing_loss,
    router_z_loss,
    top_k_gates,
    upcycle,
)
from mtbert.model_folder import load_model
from mtbert.training import Trainer

from conftest import tiny_config

CONFIG = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
ROUTING = {"token": {}, "task_aware": {},
           "task": dict(capacity_factor=None, noisy_gating=False, balance_weight=0.0)}


def batch():
    torch.manual_seed(1)
    ids = torch.randint(5, CONFIG.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids, mask


def dense_model():
    torch.manual_seed(0)
    return BertModel(CONFIG).eval()


# ---------------------------------------------------------------- upcycling


@pytest.mark.parametrize("routing", ROUTING)
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_model_computes_the_dense_model_at_step_0(routing, top_k):
    dense = dense_model()
    ids, mask = batch()
    expected = dense(ids, mask)[0]
    moe = copy.deepcopy(dense)
    router = upcycle(moe, MoEConfig(routing=routing, top_k=top_k, experts=3,
                                    **ROUTING[routing]), ["a", "b"])
    hooks = router.hooks("b") if router is not None else None
    assert sum(1 for name, _ in moe.named_parameters() if ".feed_forward.experts.2." in name)
    for training in (False, True):  # training: noisy gates pick other experts, same copies
        moe.train(training)
        if routing != "task":
            for layer in moe.layers[1::2]:
                layer.feed_forward.capacity_factor = None  # dropping tokens changes the output
        torch.testing.assert_close(moe(ids, mask, hooks=hooks)[0], expected,
                                   rtol=0, atol=1e-6)


# ---------------------------------------------------------------- routing arithmetic by hand


def test_top_k_gates_by_hand():
    logits = torch.tensor([[1.0, 3.0, 0.0, 2.0], [0.5, 0.5, 2.0, -1.0]])
    probs, experts, weights = top_k_gates(logits, 2)
    row = [math.exp(v) for v in (1.0, 3.0, 0.0, 2.0)]
    assert probs[0].tolist() == pytest.approx([v / sum(row) for v in row])
    assert experts.tolist() == [[1, 3], [2, 0]] or experts.tolist() == [[1, 3], [2, 1]]
    e3, e2 = math.exp(3.0), math.exp(2.0)
    assert weights[0].tolist() == pytest.approx([e3 / (e3 + e2), e2 / (e3 + e2)])
    assert weights.sum(1).tolist() == pytest.approx([1.0, 1.0])
    # The denominator is detached: weight i's gradient is that of p_i over the kept sum.
    logits = logits.clone().requires_grad_()
    probs, _, weights = top_k_gates(logits, 1)
    weights[0, 0].backward()
    p = probs[0].detach()
    expected = (-(p * p[1]) + torch.eye(4)[1] * p[1]) / p[1]  # d p_1 / d logits, over p_1
    torch.testing.assert_close(logits.grad[0], expected)


def test_capacity_keeps_first_choices_first_then_token_order():
    assert expert_capacity(10, 4, 2, 1.25) == 7  # ceil(6.25)
    assert expert_capacity(8, 4, 1, 1.0) == 2
    torch.manual_seed(0)
    moe = MixtureOfExperts(CONFIG, experts=2, top_k=2, capacity_factor=None,
                           token_gate=True, noisy=False, balance_weight=0.0, z_weight=0.0)
    x = torch.randn(3, CONFIG.hidden_size)
    # First choices: t0 -> e0, t1 -> e0, t2 -> e1; second choices: t0 -> e1, t1 -> e1, t2 -> e0.
    experts = torch.tensor([[0, 1], [0, 1], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
    y, routed, kept = moe.dispatch(x, experts, weights, capacity=2)
    assert routed.tolist() == [3, 3] and kept.tolist() == [2, 2]
    # e0 keeps t0, t1 (first choices) and drops t2's second choice; e1 keeps t2's first
    # choice and t0's second, dropping t1's second.
    e0, e1 = moe.experts
    expected = torch.stack([0.6 * e0.transform(x[0], 0, None) + 0.4 * e1.transform(x[0], 0, None),
                            0.7 * e0.transform(x[1], 0, None), 0.8 * e1.transform(x[2], 0, None)])
    torch.testing.assert_close(y, expected)


def test_auxiliary_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.0]])
    probs = logits.softmax(1)
    counts = torch.tensor([2, 1, 1])
    rows = [[math.exp(v) for v in row] for row in logits.tolist()]
    p_mean = [sum(r[i] / sum(r) for r in rows) / 4 for i in range(3)]
    expected = 3 * sum(f * p for f, p in zip([0.5, 0.25, 0.25], p_mean))
    assert load_balancing_loss(probs, counts).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.full((4, 3), 1 / 3)
    assert load_balancing_loss(uniform, torch.tensor([4, 4, 4])).item() == pytest.approx(1.0)
    z = sum(math.log(sum(r)) ** 2 for r in rows) / 4
    assert router_z_loss(logits).item() == pytest.approx(z, rel=1e-6)


# ---------------------------------------------------------------- dispatch vs a naive loop


def naive_moe(moe: MixtureOfExperts, x: torch.Tensor, experts, weights, capacity):
    """Token by token, first choices before second choices, each expert counting its load."""
    y = torch.zeros_like(x)
    load = [0] * len(moe.experts)
    for choice in range(experts.shape[1]):
        for token in range(len(x)):
            e = int(experts[token, choice])
            if capacity is not None and load[e] >= capacity:
                continue
            load[e] += 1
            y[token] += weights[token, choice] * moe.experts[e].transform(x[token], 0, None)
    return y


@pytest.mark.parametrize("top_k,capacity", [(1, None), (2, None), (1, 5), (2, 7)])
def test_grouped_dispatch_equals_a_per_token_loop(top_k, capacity):
    torch.manual_seed(3)
    moe = MixtureOfExperts(CONFIG, experts=4, top_k=top_k, capacity_factor=None,
                           token_gate=True, noisy=False, balance_weight=0.0, z_weight=0.0)
    x = torch.randn(20, CONFIG.hidden_size)
    _, experts, weights = top_k_gates(torch.randn(20, 4) * 2, top_k)
    y, routed, kept = moe.dispatch(x, experts, weights, capacity)
    torch.testing.assert_close(y, naive_moe(moe, x, experts, weights, capacity))
    assert routed.tolist() == torch.bincount(experts.flatten(), minlength=4).tolist()
    if capacity is not None:
        assert kept.tolist() == [min(c, capacity) for c in routed.tolist()]


def test_forward_returns_load_drops_and_losses():
    torch.manual_seed(4)
    moe = MixtureOfExperts(CONFIG, experts=4, top_k=2, capacity_factor=0.5,
                           token_gate=True, noisy=True, balance_weight=0.1, z_weight=0.01)
    torch.nn.init.normal_(moe.gate.weight)
    x = torch.randn(16, CONFIG.hidden_size)
    side = SideOutputs()
    moe.train().route(x, 3, None, side)
    load, dropped = side.statistics["moe_load.3"], side.statistics["moe_dropped.3"]
    assert load.sum().item() == pytest.approx(1.0)
    capacity = expert_capacity(16, 4, 2, 0.5)  # 4 of 32 assignments per expert at most
    kept = torch.clamp(load * 32, max=capacity).sum().item()
    assert dropped.item() == pytest.approx(1 - kept / 32)
    assert {n: t.weight for n, t in side.auxiliary.items()} == {"moe_balance": 0.1,
                                                               "moe_z": 0.01}
    assert side.auxiliary["moe_z"].value.requires_grad
    y = moe.eval().route(x, 3, None)
    _, experts, weights = top_k_gates(moe.logits(x, None, 3), 2)  # inference drops nothing:
    torch.testing.assert_close(y, moe.dispatch(x, experts, weights, None)[0])


# ---------------------------------------------------------------- Task-MoE extraction


def test_extracted_task_path_equals_the_moe_model_on_that_task():
    moe = dense_model()
    router = upcycle(moe, MoEConfig(routing="task", **ROUTING["task"]), ["a", "b", "c"])
    torch.manual_seed(5)
    with torch.no_grad():  # experts and task logits as after training: all different
        for name, p in moe.named_parameters():
            if ".feed_forward.experts." in name:
                p.add_(torch.randn_like(p) * 0.05)
        for p in router.logits.values():
            p.copy_(torch.randn_like(p))
    ids, mask = batch()
    outputs = {}
    for task in ("a", "b", "c"):
        dense = extract_task_encoder(moe, router, task).eval()
        assert not any(".experts." in name for name in dense.state_dict())
        expected = moe(ids, mask, hooks=router.hooks(task))[0]
        outputs[task] = dense(ids, mask)[0]
        torch.testing.assert_close(outputs[task], expected, rtol=0, atol=1e-6)
    chosen = {t: tuple(router.logits[t].argmax(1).tolist()) for t in "abc"}
    for t, u in (("a", "b"), ("a", "c"), ("b", "c")):
        if chosen[t] != chosen[u]:  # different paths really give different encoders
            assert not torch.allclose(outputs[t], outputs[u])


def test_extraction_refuses_mixed_paths():
    moe = dense_model()
    router = upcycle(moe, MoEConfig(routing="task", top_k=2, **ROUTING["task"]), ["a"])
    with pytest.raises(ValueError, match="top_k 1"):
        extract_task_encoder(moe, router, "a")


def test_conditioning_and_task_routing_chain():
    """Attention conditioning and Task-MoE at once: each hook of the chain acts, and the
    result equals running the conditioning on the extracted dense path of the task."""
    from mtbert.model.conditioning.attention import TaskEmbeddedAttention

    moe = dense_model()
    router = upcycle(moe, MoEConfig(routing="task", **ROUTING["task"]), ["a", "b"])
    conditioning = TaskEmbeddedAttention(CONFIG, ["a", "b"])
    torch.manual_seed(6)
    with torch.no_grad():
        for p in [*conditioning.parameters(), *router.parameters()]:
            p.copy_(torch.randn_like(p))
        for name, p in moe.named_parameters():
            if ".feed_forward.experts." in name:
                p.add_(torch.randn_like(p) * 0.05)
    ids, mask = batch()
    for task in ("a", "b"):
        hooks = ChainedHooks([conditioning.hooks(task), router.hooks(task)])
        chained = moe(ids, mask, hooks=hooks)[0]
        dense = extract_task_encoder(moe, router, task).eval()
        expected = dense(ids, mask, hooks=conditioning.hooks(task))[0]
        torch.testing.assert_close(chained, expected, rtol=0, atol=1e-5)
        assert not torch.allclose(chained, dense(ids, mask)[0])  # the conditioning acted


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("override,message", [
    ("model.moe={experts: 1}", "model.moe.experts"),
    ("model.moe={experts: 4, top_k: 5}", "model.moe.top_k"),
    ("model.moe={capacity_factor: 0}", "model.moe.capacity_factor"),
    ("model.moe={routing: task}", "model.moe.capacity_factor"),
    ("model.moe={routing: task, capacity_factor: null}", "model.moe.noisy_gating"),
    ("model.moe={routing: expert}", "model.moe.routing"),
])
def test_config_errors_name_the_key(tiny_backbone, tiny_data, override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        tiny_config(tiny_backbone, tiny_data, override)


def test_every_beyond_the_backbone_is_a_config_error(tmp_path, tiny_backbone, tiny_data):
    config = tiny_config(tiny_backbone, tiny_data, "model.moe={every: 3}", max_steps=1)
    with pytest.raises(ConfigError, match="model.moe"):
        Trainer(config, tmp_path / "run")


# ---------------------------------------------------------------- end to end


MOE_RUNS = {  # task_aware also runs task conditioning: the model chains both tasks' hooks
    "token": ["model.moe={experts: 3, top_k: 2, every: 1, capacity_factor: 1.0}"],
    "task": ["model.moe={experts: 3, every: 1, routing: task, capacity_factor: null, "
             "noisy_gating: false, balance_weight: 0}"],
    "task_aware": ["model.moe={experts: 3, every: 2, routing: task_aware}",
                   "model.conditioning=attention"],
}


@pytest.mark.parametrize("routing", MOE_RUNS)
def test_moe_run_logs_routing_and_reloads(tmp_path, tiny_backbone, tiny_data, routing):
    config = tiny_config(tiny_backbone, tiny_data, *MOE_RUNS[routing], max_steps=4,
                         evals_per_epoch=1)
    trainer = Trainer(config, tmp_path / "run")
    assert isinstance(trainer.model.hooks("sst"), ChainedHooks) == (routing == "task_aware")
    trainer.fit()
    record = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()][-1]
    layers = sorted({k.split(".")[1] for k in record["train"] if "/moe_load." in k})
    assert layers == (["1"] if routing == "task_aware" else ["0", "1"])
    for task in ("sst", "quora", "sts"):
        assert {f"{task}/moe_balance", f"{task}/moe_z", f"{task}/moe_dropped.1"} <= \
            record["train"].keys()
        loads = [v for k, v in record["train"].items() if k.startswith(f"{task}/moe_load.1.")]
        assert len(loads) == 3 and sum(loads) == pytest.approx(1.0, abs=1e-6)
    reloaded, _, _ = load_model(tmp_path / "run")
    trainer.model.load_state_dict(reloaded.state_dict())
    best = json.loads((tmp_path / "run/best/metrics.json").read_text())
    assert trainer.evaluate("dev") == best["dev"]
    if routing == "task":  # every token of a task takes the task's expert: loads are 0 or 1
        page = write_report(tmp_path / "run", str(tiny_data), max_examples=16).read_text()
        assert '<h2 id="expert-load">Expert load</h2>' in page
        table = page.split("<h3>Layer 1</h3>")[1].split("</table>")[0]
        for task in ("sst", "quora", "sts"):
            row = table.split(f"<td>{task}</td>")[1].split("</tr>")[0]
            shown = re.findall(r">(\d\.\d\d)</td>", row)
            expected = [record["train"][f"{task}/moe_load.1.{e}"] for e in range(3)]
            assert shown == [f"{v:.2f}" for v in expected] + ["0.00"]
            assert sorted(expected) == [0.0, 0.0, 1.0]


def test_moe_run_resumes_to_identical_weights(tmp_path, tiny_backbone, tiny_data):
    config = tiny_config(tiny_backbone, tiny_data, *MOE_RUNS["token"], max_steps=6,
                         checkpoint_every=3, evals_per_epoch=1)
    straight = Trainer(config, tmp_path / "straight")
    straight.fit()
    first = Trainer(copy.deepcopy(config), tmp_path / "resumed")
    first.total_steps = 3
    first.fit()
    second = Trainer(copy.deepcopy(config), tmp_path / "resumed")
    second.resume()
    second.fit()
    expected, actual = straight.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_export_refuses_moe_but_extracts_a_task_path(tmp_path, tiny_backbone, tiny_data):
    from mtbert.evaluation import predict
    from mtbert.export import ExportError, export

    runs = {}
    for routing in ("token", "task"):
        runs[routing] = tmp_path / routing
        trainer = Trainer(tiny_config(tiny_backbone, tiny_data, *MOE_RUNS[routing],
                                      max_steps=3), runs[routing])
        trainer.fit()
    with pytest.raises(ExportError, match="not plain BERT"):
        export(runs["token"], tmp_path / "out", "hf")
    with pytest.raises(ExportError, match="not plain BERT.*top_k 1"):
        export(runs["token"], tmp_path / "out", "hf", task="sst")
    with pytest.raises(ExportError, match="--task NAME"):
        export(runs["task"], tmp_path / "out", "onnx")
    model, _, _ = load_model(runs["task"])
    for task in ("sst", "sts"):
        folder = export(runs["task"], tmp_path / f"hf-{task}", "hf", task=task).folder
        dense, _, config = load_model(folder)
        assert [t.name for t in config.tasks] == [task] and config.model.moe is None
        assert not any(".experts." in name for name in dense.state_dict())
        split = trainer.data[task].dev
        torch.testing.assert_close(torch.as_tensor(predict(dense, task, split, 16)),
                                   torch.as_tensor(predict(model, task, split, 16)))


def test_rows_added_to_round_the_packed_tokens_take_no_part_in_routing():
    """bf16 on CPUs rounds the packed rows up (`TokenLayout.packed(row_multiple=...)`): the
    filler rows must not take capacity or enter the load statistics and auxiliary losses."""
    from mtbert.model.bert import TokenLayout

    model = dense_model()
    upcycle(model, MoEConfig(routing="token", top_k=1, experts=3, noisy_gating=False,
                             capacity_factor=1.0), ["a"])
    model.train()
    ids, mask = batch()
    for layer in model.layers[1::2]:
        torch.nn.init.normal_(layer.feed_forward.gate.weight)  # a router preferring some experts
    outputs, sides = [], []
    for multiple in (1, 64):
        layout = TokenLayout.packed(mask, row_multiple=multiple)
        assert layout.index.numel() == (int(mask.sum()) if multiple == 1 else 64)
        sides.append(SideOutputs())
        outputs.append(model.encode(ids, None, layout, side=sides[-1]))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    exact, rounded = sides
    for name, term in exact.auxiliary.items():
        torch.testing.assert_close(rounded.auxiliary[name].value, term.value)
    assert rounded.statistics.keys() == exact.statistics.keys()
    for name, value in exact.statistics.items():
        torch.testing.assert_close(rounded.statistics[name], value)
    assert any(v > 0 for k, v in exact.statistics.items() if "dropped" in k)  # capacity acted


# ---------------------------------------------------------------- composition (issue 36)


@pytest.mark.parametrize("variant", ["lora", "mtl_lora"])
def test_adapters_reach_every_expert_and_fold_into_them(variant):
    """LoRA / MTL-LoRA on intermediate and output adapt each expert of an MoE layer by the
    task's update: their parameters learn there, and `fold` puts them into every expert."""
    from mtbert.model.conditioning import CONDITIONINGS
    from mtbert.model.conditioning.low_rank import fold

    model = dense_model()
    upcycle(model, MoEConfig(routing="token", top_k=2, experts=3, capacity_factor=None,
                             noisy_gating=False), ["a"])
    adapters = CONDITIONINGS[variant](CONFIG, ["a"], rank=2, targets=["intermediate", "output"])
    torch.manual_seed(7)
    with torch.no_grad():  # as after training: adapters non-zero, experts and gates apart
        for name, p in [*adapters.named_parameters(), *model.named_parameters()]:
            if "feed_forward" in name or name.split(".")[0] in ("adapters", "shared", "tasks"):
                p.add_(torch.randn_like(p) * 0.1)
    ids, mask = batch()
    model.train()(ids, mask, hooks=adapters.hooks("a"))[0].square().sum().backward()
    for name, p in adapters.named_parameters():  # layers 1 and 3 are MoE layers
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    torch.testing.assert_close(fold(model, adapters, "a")(ids, mask)[0],
                               model(ids, mask, hooks=adapters.hooks("a"))[0],
                               rtol=0, atol=1e-5)


def graph_tensors(model: torch.nn.Module) -> list[str]:
    """Attributes of the model's modules (or fields of dataclasses they hold) that are
    tensors with an autograd graph."""
    import dataclasses

    found = []
    for module_name, module in model.named_modules():
        for key, value in vars(module).items():
            values = {key: value}
            if dataclasses.is_dataclass(value):
                values = {f"{key}.{f.name}": getattr(value, f.name)
                          for f in dataclasses.fields(value)}
            found += [f"{module_name}.{k}" for k, v in values.items()
                      if isinstance(v, torch.Tensor) and v.grad_fn is not None]
    return found


def test_moe_keeps_no_graph_after_a_training_step(tmp_path, tiny_backbone, tiny_data):
    """The auxiliary losses travel with the pass's output: after a training step no module
    holds a graph (which kept the last step's activations alive) and the model deep-copies."""
    config = tiny_config(tiny_backbone, tiny_data, *MOE_RUNS["token"], max_steps=1)
    trainer = Trainer(config, tmp_path / "run")
    logged = trainer.train_step()
    assert logged["sst/moe_balance"] > 0
    assert graph_tensors(trainer.model) == []
    copied = copy.deepcopy(trainer.model)
    assert copied.state_dict().keys() == trainer.model.state_dict().keys()


def test_lora_and_moe_runs_export_a_task_or_refuse_in_one_line(tmp_path, tiny_backbone,
                                                               tiny_data):
    """Task-routed experts with LoRA on the FFN export a task as plain BERT (its path
    extracted, its adapters folded in); token-routed ones are refused in one line."""
    from mtbert.evaluation import predict
    from mtbert.export import ExportError, export

    lora = ["model.conditioning=lora",
            "model.conditioning_options={rank: 2, targets: [intermediate, output]}"]
    runs = {}
    for routing in ("token", "task"):
        runs[routing] = tmp_path / routing
        trainer = Trainer(tiny_config(tiny_backbone, tiny_data, *MOE_RUNS[routing], *lora,
                                      max_steps=2), runs[routing])
        trainer.fit()
    with pytest.raises(ExportError) as refused:
        export(runs["token"], tmp_path / "out", "hf", task="sst")
    assert "\n" not in str(refused.value) and "mixture of experts" in str(refused.value)
    model, _, _ = load_model(runs["task"])
    folder = export(runs["task"], tmp_path / "hf-sts", "hf", task="sts").folder
    dense, _, config = load_model(folder)
    assert config.model.moe is None and config.model.conditioning is None
    split = trainer.data["sts"].dev
    torch.testing.assert_close(torch.as_tensor(predict(dense, "sts", split, 16)),
                               torch.as_tensor(predict(model, "sts", split, 16)),
                               rtol=0, atol=1e-4)


def test_weights_saved_before_the_ffn_was_a_module_still_load():
    """Checkpoints name a layer's FFN `layers.N.intermediate.*` / `.output.*` and its experts
    `layers.N.moe.*` from before `BertLayer.feed_forward`; they load into today's model."""
    from mtbert.model.multitask import MultitaskModel
    from mtbert.model_folder import _load_weights

    def legacy(state):
        return {re.sub(r"(layers\.\d+\.)feed_forward\.(?=experts|gate|noise)", r"\1moe.",
                       k).replace("feed_forward.", ""): v for k, v in state.items()}

    moe = dense_model()
    upcycle(moe, MoEConfig(routing="token", experts=2), ["a"])
    for source in (dense_model(), moe):
        saved = {k: torch.randn_like(v) for k, v in source.state_dict().items()}
        old = legacy(saved)
        assert not any("feed_forward" in k for k in old)
        source.load_state_dict(old)
        assert all(torch.equal(source.state_dict()[k], v) for k, v in saved.items())
        model = MultitaskModel(source, [])
        _load_weights(model, {f"encoder.{k}": v for k, v in old.items()}, "run/best", set())
        assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in saved.items())
