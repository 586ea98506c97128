"""The simulated cost of a client-round: FLOPs, seconds, bytes and peak memory (pure functions).

FLOPs come from the model's actual (pruned) shapes, the LoRA rank and the tokens
processed; a multiply-add counts 2 FLOPs. For ``N = batch x seq`` tokens and a frozen
linear ``(out, in)``: forward ``2 N out in``, backward ``2 N out in`` (input gradient only,
no weight gradient). A rank-r LoRA on it adds ``2 N r (in + out)`` forward and
``4 N r (in + out)`` backward (gradients of A, B and the input). Attention scores and
the weighted sum cost ``4 B T^2 d_attn`` forward and twice that backward, with ``d_attn``
the kept query width. Embedding lookups are free; the task head is counted (a causal LM's
frozen output projection ``2 N H V`` each way; a classifier's pooler and head on ``B``
tokens). Validated against ``torch.utils.flop_counter`` in ``tests/test_cost.py``.

Memory: weights at their stored width (fp32 4 bytes, fp16/bf16 2, int8 1, nf4 0.5 plus
one fp32 absmax per 64 weights), 16 bytes per trainable parameter (fp32 value, gradient,
AdamW's two moments), and activations kept for the backward pass, estimated per layer as
``N (8 H + 2 d_attn + 2 k F) + 2 B heads T^2`` values at 4 bytes (k = 1 or 2 FFN input
projections), plus 10% for the framework. Time: compute at ``peak x efficiency`` of the
device, scaled by its per-round speed factor; communication at its link bandwidths, scaled by
its link factor (both factors carry the fleet's hidden heterogeneity, :mod:`fedtune.fleet.hidden`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fedtune.fleet.devices import DeviceProfile
from fedtune.pruning.structure import LayerStructure, Masks

__all__ = ["ModelShape", "model_shape", "train_flops", "peak_memory_bytes", "ClientCost", "client_round_cost", "BYTES_PER_WEIGHT"]


BYTES_PER_WEIGHT = {"none": 4.0, "fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 4.0 / 64}


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a (pruned) transformer."""

    hidden: int
    layers: list[dict[str, tuple[int, int]]]  # per layer: path inside the layer -> (out, in) after pruning
    heads: list[int]  # kept query heads per layer
    vocab: int
    num_labels: int  # 0 for a causal LM
    embedding_params: int  # parameters outside the layers (embeddings, norms, pooler, head)


def model_shape(config: object, structure: list[LayerStructure], masks: Masks | None = None,
                embedding_params: int = 0) -> ModelShape:
    """Shapes of every prunable linear after applying ``masks`` (``None``: unpruned)."""
    hidden = int(config.hidden_size)  # type: ignore[attr-defined]
    layers, heads = [], []
    for ls in structure:
        m = masks[ls.layer] if masks else None
        units = int(m["attn"].sum()) if m else ls.num_units
        ffn = int(m["ffn"].sum()) if m else ls.ffn_dim
        paths = [*ls.attn_in, ls.attn_out, *ls.ffn_in, ls.ffn_out]
        prefix = os.path.commonprefix(paths).rsplit(".", 1)[0] + "."

        def rel(path: str, prefix: str = prefix) -> str:
            return path[len(prefix):]

        shapes: dict[str, tuple[int, int]] = {}
        for name in ls.attn_in:
            shapes[rel(name)] = (units * ls.attn_rows[name], hidden)
        d_attn = units * ls.out_cols_per_unit
        shapes[rel(ls.attn_out)] = (hidden, d_attn)
        for name in ls.ffn_in:
            shapes[rel(name)] = (ffn, hidden)
        shapes[rel(ls.ffn_out)] = (hidden, ffn)
        layers.append(shapes)
        head_dim = int(getattr(config, "head_dim", None) or hidden // config.num_attention_heads)  # type: ignore[attr-defined]
        heads.append(d_attn // head_dim)
    task_labels = 0 if getattr(config, "is_decoder", False) or "CausalLM" in str(getattr(config, "architectures", "")) \
        else int(getattr(config, "num_labels", 2))
    return ModelShape(hidden=hidden, layers=layers, heads=heads, vocab=int(config.vocab_size),  # type: ignore[attr-defined]
                      num_labels=task_labels, embedding_params=embedding_params)


def train_flops(shape: ModelShape, batch: int, seq: int, rank: int, lora_modules: set[str] | None = None,
                causal_lm: bool = False) -> float:
    """FLOPs of one training step (forward + backward), module docstring for the formula.

    ``lora_modules``: paths inside a layer (as in ``shape.layers``) that carry a LoRA of ``rank``;
    ``None`` means all of them.
    """
    n = batch * seq
    total = 0.0
    for shapes in shape.layers:
        for name, (out_f, in_f) in shapes.items():
            total += 4.0 * n * out_f * in_f  # frozen: forward + input gradient
            if lora_modules is None or name in lora_modules:
                total += 6.0 * n * rank * (in_f + out_f)
        d_attn = shapes[next(k for k in shapes if k.endswith(("o_proj", "attention.output.dense")))][1]
        total += 12.0 * batch * seq * seq * d_attn
    h = shape.hidden
    if causal_lm:
        total += 4.0 * n * h * shape.vocab
    else:
        total += 4.0 * batch * h * h + 6.0 * batch * h * max(shape.num_labels, 1)  # pooler (frozen) + head
    return total


def peak_memory_bytes(shape: ModelShape, batch: int, seq: int, rank: int, quantization: str = "none",
                      lora_modules: set[str] | None = None, trainable_extra: int = 0) -> float:
    """Estimated peak training memory in bytes (module docstring)."""
    n = batch * seq
    width = BYTES_PER_WEIGHT[quantization]
    linear = adapter = acts = 0.0
    for shapes, heads in zip(shape.layers, shape.heads):
        for name, (out_f, in_f) in shapes.items():
            linear += out_f * in_f
            if lora_modules is None or name in lora_modules:
                adapter += rank * (in_f + out_f)
        d_attn = shapes[next(k for k in shapes if k.endswith(("o_proj", "attention.output.dense")))][1]
        ffn_ins = [k for k in shapes if k.endswith(("up_proj", "gate_proj", "intermediate.dense"))]
        ffn = shapes[ffn_ins[0]][0] if ffn_ins else 0
        acts += n * (8 * shape.hidden + 2 * d_attn + 2 * len(ffn_ins) * ffn) + 2 * batch * heads * seq * seq
    weights = linear * width + shape.embedding_params * 4.0
    return 1.1 * (weights + 16.0 * (adapter + trainable_extra) + 4.0 * acts)


@dataclass(frozen=True)
class ClientCost:
    flops: float
    compute_s: float
    comm_s: float
    total_s: float
    peak_mem_gb: float
    oom: bool


def client_round_cost(device: DeviceProfile, *, flops_per_step: float, steps: int, bytes_down: int, bytes_up: int,
                      peak_bytes: float, dtype: str = "fp32", speed_factor: float = 1.0,
                      link_factor: float = 1.0) -> ClientCost:
    """Simulated seconds and memory of one client-round on ``device``: ``speed_factor`` multiplies its
    compute speed (per-round jitter, hidden multipliers), ``link_factor`` both its bandwidths."""
    flops = flops_per_step * steps
    compute = flops / (device.peak_flops(dtype) * device.efficiency * speed_factor)
    comm = (8.0 * bytes_down / (device.downlink_mbps * 1e6) + 8.0 * bytes_up / (device.uplink_mbps * 1e6)) / link_factor
    gb = peak_bytes / 1e9
    return ClientCost(flops=flops, compute_s=compute, comm_s=comm, total_s=compute + comm, peak_mem_gb=gb,
                      oom=gb > device.memory_gb)
