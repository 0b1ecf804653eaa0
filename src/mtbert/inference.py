"""Fast CPU inference: bf16 weights, int8 dynamic quantization, and ONNX Runtime for one task.

`to_bf16` and `quantize_dynamic` return a `MultitaskModel` copy whose matrix products run in
bf16 or int8; both predict through the usual `evaluation.predict`. `export_onnx` writes the
encoder plus one task's head as an ONNX graph, and `OnnxPredictor` runs it with ONNX Runtime
(optional dependencies: `pip install onnxruntime onnx`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mtbert.config import TaskConfig
from mtbert.data.batching import Batch, EncodedSplit, collate, sorted_batches
from mtbert.evaluation import to_predictions
from mtbert.model.bert import TokenLayout
from mtbert.model.heads import is_siamese, pool
from mtbert.model.multitask import MultitaskModel


def to_bf16(model: MultitaskModel) -> MultitaskModel:
    """A copy in eval mode with every weight in bf16: on CPUs with AVX512-BF16 or AMX (and on
    GPUs) its matrix products run several times faster than fp32's, with no cast per call.
    Hidden states are bf16 between operations (layer norm, softmax and pooling accumulate in
    fp32 inside their kernels); the prediction paths return fp32 outputs. The original model
    is left unchanged."""
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def quantize_dynamic(model: MultitaskModel, keep_fp32: Sequence[str] = ()) -> MultitaskModel:
    """A copy in eval mode whose encoder `nn.Linear` layers are int8 dynamically quantized:
    int8 weights with a scale per output channel, activations quantized per batch.

    Embeddings, LayerNorms, conditioning and heads stay fp32, and so do encoder modules named
    in `keep_fp32` with everything under them (e.g. `"layers.0"`). The original model is left
    unchanged. Uses `torch.ao.quantization`, which PyTorch marks as deprecated (those warnings
    are silenced here); torchao is the announced successor.
    """
    quantized = copy.deepcopy(model).eval()
    kept = tuple(keep_fp32)
    spec = {name: torch.ao.quantization.per_channel_dynamic_qconfig
            for name, module in quantized.encoder.named_modules()
            if isinstance(module, nn.Linear)
            and not any(name == k or name.startswith(k + ".") for k in kept)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor", category=UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.ao.quantization.quantize_dynamic(quantized.encoder, spec, dtype=torch.qint8,
                                               inplace=True)
    return quantized


class TaskGraph(nn.Module):
    """The encoder and one task's head as a single function of tensors, for export.

    Every position is computed and the padding mask always applied
    (`TokenLayout.padded`): an exported graph must not depend on where the example batch
    happened to have padding (`BertModel.forward` packs the real tokens, a data-dependent
    shape, and skips an all-ones mask).
    """

    def __init__(self, model: MultitaskModel, task: str):
        super().__init__()
        self.model, self.task = model, task
        self.pooling = model.tasks[task].head.pooling

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor,
                pair_index: Tensor | None = None) -> Tensor:
        model = self.model
        hooks = model.hooks(self.task)
        x = model.encoder.encode(input_ids, token_type_ids, TokenLayout.padded(attention_mask),
                                 hooks)
        pooled = model.encoder.pooler(x) if self.pooling == "pooler" else None
        vectors = pool(x, pooled, attention_mask, self.pooling)
        return model.heads[self.task](vectors, pair_index).predictions


def _input_names(task: TaskConfig) -> list[str]:
    names = ["input_ids", "attention_mask", "token_type_ids"]
    return [*names, "pair_index"] if is_siamese(task) else names


def export_onnx(model: MultitaskModel, task: str, path: str | Path, quantize: bool = False,
                opset: int = 17) -> Path:
    """Write the encoder and `task`'s head to `path` (rows and tokens are dynamic axes).

    Inputs are named like `Batch` fields (`pair_index` only for siamese heads); the output
    `predictions` is the head's raw output. `quantize` stores the matrix products as int8
    (ONNX Runtime's dynamic quantization, per-channel weights). Uses PyTorch's TorchScript
    exporter (`dynamo=False`; deprecated, warning silenced): it is fast and needs no onnxscript.
    """
    _onnxruntime()  # fail early, with the install hint, when the runtime is missing
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.tasks[task]
    names = _input_names(config)
    rows, tokens = 4, 8
    example = [torch.full((rows, tokens), 5, dtype=torch.long),
               torch.ones(rows, tokens, dtype=torch.long),
               torch.zeros(rows, tokens, dtype=torch.long)]
    example[1][0, tokens // 2:] = 0
    axes = {"input_ids": {0: "rows", 1: "tokens"}, "attention_mask": {0: "rows", 1: "tokens"},
            "token_type_ids": {0: "rows", 1: "tokens"}, "predictions": {0: "examples"}}
    if "pair_index" in names:
        example.append(torch.tensor([[0, 1], [2, 3], [1, 2]]))
        axes["pair_index"] = {0: "examples"}
    graph = TaskGraph(copy.deepcopy(model).float().eval(), task).eval()
    fp32_path = path.with_suffix(".fp32.onnx") if quantize else path
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(graph, tuple(example), str(fp32_path), input_names=names,
                          output_names=["predictions"], dynamic_axes=axes,
                          opset_version=opset, dynamo=False)
    if quantize:
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # its advice to pre-process does not help here
        try:
            ort_quantize_dynamic(fp32_path, path, per_channel=True, weight_type=QuantType.QInt8)
        finally:
            logging.disable(previous)
            fp32_path.unlink()
    return path


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("ONNX inference needs onnxruntime and onnx: "
                          "`pip install onnxruntime onnx`") from error
    return onnxruntime


class OnnxPredictor:
    """Runs a graph written by `export_onnx` with ONNX Runtime on the CPU."""

    def __init__(self, path: str | Path, task: TaskConfig, threads: int | None = None):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.task = task
        self.names = _input_names(task)

    def outputs(self, batch: Batch) -> np.ndarray:
        """Raw head outputs of one batch, like `model(task, batch).predictions`."""
        feed = {name: getattr(batch, name).numpy() for name in self.names}
        return self.session.run(["predictions"], feed)[0]

    def predict(self, split: EncodedSplit, batch_size: int = 128, pad_id: int = 0) -> np.ndarray:
        """Predictions for every example of `split`, in its order (as `evaluation.predict`)."""
        out = torch.empty(len(split))
        for rows in sorted_batches(split.lengths(), batch_size):
            batch = collate(split, rows, pad_id)
            out[batch.rows] = to_predictions(self.task, torch.from_numpy(self.outputs(batch)))
        return out.numpy()
