"""What each device would deploy at the end of a run: its pruned model at the common target sparsity.

Methods that prune at different speeds leave devices at different sparsities when training
stops (a device sampled once with a small pruning step is still half way). To compare
methods *at equal sparsity*, as FedSpine does, every device that took part is completed to
the run's target sparsity on the server before deployment: the units its own masks kept
are ranked Wanda-style (Sun et al. 2024) by ``|W + B A| * ||x||``: the merged weights (the global
adapter) times the norm of each input feature over a calibration batch from the device's *own*
data (one forward pass on the device, no training, no data leaves it), and the lowest are pruned
until each layer reaches the target (:func:`complete_masks`; masks only grow, so what the device
pruned in training stays pruned). Weight magnitude alone is a poor criterion for Llama-style
models: 10% of SmolLM2-135M's FFN channels pruned by it take the held-out perplexity from 28 to
over 70,000 (by this criterion: 35, random: 75; simulations/bench/deploy_criterion.py), because small
weights can meet very large activations. The report then measures,
on a few devices (one per device class first), the held-out accuracy of the deployed
(masked) model, its parameter count and size once the pruned structures are sliced away,
and its CPU latency against the dense model, all in the same process.

A method that pruned during training had its adapter adapt to the pruned structure; one
that did not pays for it here in deployed accuracy. ``summary.json`` keeps both the
sparsity reached in training (``trained_sparsity``) and after completion.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch

from fedtune.core.metric import metric_for_task
from fedtune.core.protocol import PruneSpec
from fedtune.data.batching import collate
from fedtune.lora.factors import GlobalAdapter
from fedtune.models.loading import float_weight
from fedtune.pruning.importance import prune_step, unit_scores, units_to_prune
from fedtune.pruning.masks import structural_sparsity
from fedtune.pruning.slicing import slice_model
from fedtune.pruning.structure import LayerStructure, Masks, apply_masks

__all__ = ["complete_masks", "deployment_report", "merged_magnitudes", "pick_clients", "reaches"]


def _input_norms(model: torch.nn.Module, paths: list[str], masks: Masks, structure: list[LayerStructure],
                 batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-input-feature L2 norm of each module's input over ``batches`` (with ``masks`` applied)."""
    sums: dict[str, torch.Tensor] = {}
    handles = apply_masks(model, structure, masks)

    def hook(path: str) -> Any:
        def fn(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[path] = sums.get(path, 0) + x.pow(2).sum(0).cpu()
        return fn

    handles += [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in paths]
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {p: v.sqrt() for p, v in sums.items()}


def _prunable_paths(structure: list[LayerStructure]) -> list[str]:
    return [p for ls in structure for p in (*ls.attn_in, ls.attn_out, *ls.ffn_in, ls.ffn_out)]


def merged_magnitudes(model: torch.nn.Module, structure: list[LayerStructure],
                      state: GlobalAdapter) -> dict[str, torch.Tensor]:
    """``|W + B A|`` of every prunable module: the same for every device, so computed once per report."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for path in _prunable_paths(structure):
            w = float_weight(model.get_submodule(path)).float().cpu()
            if path in state.adapter or path in state.frozen:
                w = w + state.delta(path).float().cpu()
            out[path] = w.abs()
    return out


def reaches(masks: Masks, target: float, skip_layers: frozenset[int] = frozenset()) -> bool:
    """Whether :func:`fedtune.pruning.importance.prune_step` at ``target`` would prune nothing more."""
    return all(int((~keep).sum()) >= units_to_prune(target, keep.numel())
               for layer, m in masks.items() if layer not in skip_layers for keep in m.values())


def complete_masks(model: torch.nn.Module, structure: list[LayerStructure], state: GlobalAdapter, masks: Masks,
                   target: float, skip_layers: frozenset[int] = frozenset(),
                   calibration: list[dict[str, torch.Tensor]] | None = None,
                   magnitudes: dict[str, torch.Tensor] | None = None) -> Masks:
    """``masks`` grown to ``target`` per layer and kind: by ``|W + B A| * ||x||`` with ``calibration``
    batches (the device's own data), else by merged-weight magnitude ``|W + B A|`` (``magnitudes``:
    :func:`merged_magnitudes`, when already computed). Masks already at the target come back as they are."""
    if reaches(masks, target, skip_layers):
        return masks
    magnitudes = magnitudes if magnitudes is not None else merged_magnitudes(model, structure, state)
    norms = _input_norms(model, _prunable_paths(structure), masks, structure, calibration) if calibration else {}
    weights = {p: w * norms[p][None, :] if p in norms else w for p, w in magnitudes.items()}
    return prune_step(masks, unit_scores(structure, weights), target, skip_layers)


def pick_clients(client_ids: list[int], classes: dict[int, str], limit: int) -> list[int]:
    """Up to ``limit`` clients, one of each device class in turn (lowest ids first)."""
    by_class: dict[str, list[int]] = {}
    for cid in sorted(client_ids):
        by_class.setdefault(classes.get(cid, "?"), []).append(cid)
    out: list[int] = []
    while len(out) < limit and any(by_class.values()):
        for name in sorted(by_class):
            if by_class[name] and len(out) < limit:
                out.append(by_class[name].pop(0))
    return out


def _latency_ms(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int = 3) -> float:
    best = float("inf")
    with torch.inference_mode():
        model(**batch)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**batch)
            best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def deployment_report(base: Any, cfg: Any, state: GlobalAdapter, structure: list[LayerStructure],
                      client_masks: dict[int, Masks], target: float, eval_data: Any,
                      payload_for: Callable[[int], GlobalAdapter], classes: dict[int, str],
                      evaluate: Callable[..., dict[str, float]], say: Callable[[str], None] = print,
                      calibration_for: Callable[[int], Any] | None = None, calibration_examples: int = 32) -> dict[str, Any]:
    """Complete every device's masks to ``target`` and measure a few deployed models (module docstring).
    ``calibration_for(client_id)``: the device's own tokenized data (its first examples calibrate)."""
    skip = frozenset(PruneSpec.from_config(cfg.prune, target, len(structure)).skip_layers)  # as in training
    trained = {cid: structural_sparsity(m, skip) for cid, m in client_masks.items()}

    def inputs(data: Any, n: int) -> dict[str, torch.Tensor]:
        """The model inputs of ``data``'s first ``n`` examples (no labels), on the model's device."""
        batch = collate(data, list(range(min(len(data), n))), base.tokenizer.pad_token_id, cfg.model.task)
        return {k: v.to(base.device) for k, v in batch.items() if k != "labels"}

    def calib(cid: int) -> list[dict[str, torch.Tensor]] | None:
        data = calibration_for(cid) if calibration_for is not None else None
        return [inputs(data, calibration_examples)] if data is not None and len(data) else None

    magnitudes = None if all(reaches(m, target, skip) for m in client_masks.values()) else merged_magnitudes(
        base.model, structure, state)
    deployed = {cid: m if reaches(m, target, skip) else
                complete_masks(base.model, structure, state, m, target, skip, calib(cid), magnitudes)
                for cid, m in client_masks.items()}
    picked = pick_clients(list(client_masks), classes, cfg.prune.deploy_eval_clients)
    names = ", ".join(f"{c} ({classes.get(c, '?')})" for c in picked)
    say(f"deployment: {len(deployed)} devices completed to sparsity {target}; evaluating {len(picked)}"
        f" deployed models: {names}")
    measured: list[dict[str, Any]] = []
    sliceable = cfg.model.quantization == "none" and not any(
        type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in base.model.modules())
    batch = None
    dense_ms = None
    if sliceable and len(eval_data):
        batch = inputs(eval_data, cfg.train.eval_batch_size)
        dense_ms = _latency_ms(base.model, batch)
    dense_params = sum(p.numel() for p in base.model.parameters())
    for cid in picked:
        row: dict[str, Any] = {"client_id": cid, "device": classes.get(cid), "trained_sparsity": round(trained[cid], 4),
                               "deployed_sparsity": round(structural_sparsity(deployed[cid], skip), 4)}
        row.update(evaluate(payload_for(cid), deployed[cid]))
        if sliceable:
            model = slice_model(copy.deepcopy(base.model), structure, deployed[cid])
            row["params"] = sum(p.numel() for p in model.parameters())
            row["size_mb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 3)
            if batch is not None:
                row["latency_ms"] = round(_latency_ms(model, batch), 3)
            del model
        measured.append(row)
    metric = metric_for_task(cfg.model.task).key

    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    out: dict[str, Any] = {
        "target_sparsity": target, "devices": len(deployed),
        "criterion": "wanda (device data)" if calibration_for is not None else "magnitude",
        "trained_sparsity": round(sum(trained.values()) / max(len(trained), 1), 4),
        "deployed_sparsity": round(sum(structural_sparsity(m, skip) for m in deployed.values()) / max(len(deployed), 1), 4),
        "metric": metric, metric: mean(metric, measured), "eval_loss": mean("eval_loss", measured),
        "params": mean("params", measured), "dense_params": dense_params, "size_mb": mean("size_mb", measured),
        "latency_ms": mean("latency_ms", measured), "dense_latency_ms": round(dense_ms, 3) if dense_ms else None,
        "latency_batch": None if batch is None else int(next(iter(batch.values())).shape[0]),
        "evaluated": measured,
    }
    say(f"deployment: sparsity trained {out['trained_sparsity']} -> deployed {out['deployed_sparsity']};"
        f" {metric} of deployed models {out[metric]}; latency {out['latency_ms']} ms vs dense {out['dense_latency_ms']}")
    return out
