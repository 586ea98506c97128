"""Local LoRA training on a client and evaluation of a global adapter.

Both run on the process-wide cached base model: LoRA layers of the requested rank are
injected, loaded from fedtune factors (:mod:`fedtune.lora.factors` conventions), used, read
back and removed, so one worker serves any number of clients of any rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.core.protocol import PruneSpec, TrainerSettings
from fedtune.data.batching import Tokenized, batches, collate, label_log_prior
from fedtune.lora.attach import (
    add_frozen_delta,
    attach_lora,
    detach_lora,
    load_factors,
    lora_layers,
    module_shapes,
    read_factors,
)
from fedtune.lora.factors import Factors, GlobalAdapter, adapter_rank
from fedtune.models.loading import BaseModel
from fedtune.pruning.masks import structural_sparsity
from fedtune.pruning.prune_and_tune import PruneAndTune
from fedtune.pruning.structure import Masks, apply_masks, model_structure, sparsity
from fedtune.training.loss import chunked_causal_lm_loss

__all__ = ["LocalResult", "evaluate_global", "head_state", "lora_shapes", "lr_factor", "train_local"]


@dataclass
class LocalResult:
    factors: Factors
    head: dict[str, torch.Tensor]
    train_loss: float  # mean loss over the local steps
    num_examples: int
    train_time_s: float  # wall time of the local steps (excludes message handling)
    steps: int
    tokens: int = 0  # token positions processed (padded batches), for the cost model
    loss_start: float = float("nan")  # mean loss of the first quarter of the steps
    loss_end: float = float("nan")  # mean loss of the last quarter
    masks: Masks | None = None  # pruning masks after this round (True = kept)
    scores: dict[int, dict[str, torch.Tensor]] | None = None  # EMA group importance
    # per unit: the local step after which it was pruned (-1 kept, 0 before this round), int32
    pruned_at: Masks | None = None
    sparsity: float = 0.0  # structural sparsity reached (fedtune.pruning.masks.structural_sparsity)
    param_sparsity: float = 0.0  # fraction of the prunable weights' parameters removed


def _prepare(base: BaseModel, state: GlobalAdapter, rank: int, cfg: TrainerSettings) -> tuple[Any, list[Any]]:
    """Inject LoRA at ``rank``, load the state's factors and head, hook its frozen part."""
    peft_model = attach_lora(base, rank, cfg.lora, cfg.prunes)
    try:
        if state.adapter:
            load_factors(peft_model, state.adapter)
        params = dict(peft_model.base_model.model.named_parameters())
        with torch.no_grad():
            for name, t in state.head.items():
                if name not in params:
                    raise KeyError(f"head tensor {name!r} is not a parameter of the base model")
                params[name].copy_(t)
        handles = add_frozen_delta(peft_model, state.frozen) if state.frozen else []
    except Exception:
        _release(peft_model, base, [], {})
        raise
    return peft_model, handles


def _release(peft_model: Any, base: BaseModel, handles: list[Any], head: dict[str, torch.Tensor]) -> None:
    """Undo :func:`_prepare`: remove hooks and LoRA layers, restore the base's own head."""
    for h in handles:
        h.remove()
    peft_model.eval()
    detach_lora(peft_model, base)
    params = dict(base.model.named_parameters())
    with torch.no_grad():
        for name, t in head.items():
            params[name].copy_(t)


def _trainable(inner: torch.nn.Module, base: BaseModel, train_a: bool) -> list[torch.nn.Parameter]:
    """Freeze everything but LoRA's B (and A unless frozen) and the task head; returns those."""
    trainable = []
    for name, p in inner.named_parameters():
        is_a, is_b = ".lora_A." in name, ".lora_B." in name
        train = (is_a and train_a) or is_b or name in base.head_names
        p.requires_grad_(train)
        if train:
            trainable.append(p)
    return trainable


def _loss(peft_model: Any, base: BaseModel, batch: dict[str, torch.Tensor], cfg: TrainerSettings,
          log_prior: torch.Tensor | None) -> torch.Tensor:
    """One minibatch's training loss: chunked for long causal-LM batches, logit-adjusted for
    classification when ``log_prior`` is given, else the model's own loss."""
    chunk = cfg.train.loss_chunk_tokens
    if base.config.task == "causal-lm" and 0 < chunk < batch["input_ids"].numel():
        return chunked_causal_lm_loss(peft_model.base_model.model, batch["input_ids"], batch["attention_mask"],
                                      batch["labels"], chunk)
    if log_prior is None:
        return peft_model(**batch).loss
    labels = batch.pop("labels")
    return torch.nn.functional.cross_entropy(peft_model(**batch).logits + log_prior, labels)


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """The multiple of ``train.learning_rate`` at local step ``step`` (0-based) of ``total``: a linear
    warm-up over the first ``warmup`` steps ((step + 1) / (warmup + 1)), then ``constant`` (1),
    ``cosine`` (0.5 (1 + cos(pi p))) or ``linear`` (1 - p), p = (step - warmup) / (total - warmup)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    p = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return max(0.0, 1.0 - p)
    return 1.0


def rank_learning_rate(train: Any, rank: int) -> float:
    """``train.learning_rate``, scaled by ``sqrt(train.lr_reference_rank / rank)`` when that is set."""
    if train.lr_reference_rank > 0:
        return train.learning_rate * math.sqrt(train.lr_reference_rank / rank)
    return train.learning_rate


def local_optimizer(params: Any, train: Any, rank: int = 0) -> torch.optim.Optimizer:
    """The round's local optimizer (``train.optimizer``), fresh every round: AdamW with
    ``train.adam_eps``, or SGD with ``train.momentum``; its rate is :func:`rank_learning_rate`'s for
    ``rank`` (each parameter group keeps it as ``base_lr``, which the schedule scales)."""
    lr = rank_learning_rate(train, rank) if rank > 0 else train.learning_rate
    if train.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=train.momentum,
                                                     weight_decay=train.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, eps=train.adam_eps, weight_decay=train.weight_decay)
    for group in opt.param_groups:
        group["base_lr"] = lr
    return opt


def _before_step(opt: torch.optim.Optimizer, cfg: TrainerSettings, step: int, total: int) -> None:
    """The step's learning rate (``train.lr_schedule``, ``train.warmup_steps``) and gradient clipping
    (``train.max_grad_norm``, over all trainable parameters); neither touches anything by default."""
    train = cfg.train
    if train.lr_schedule != "constant" or train.warmup_steps > 0:
        for group in opt.param_groups:
            group["lr"] = group.get("base_lr", train.learning_rate) * lr_factor(step, total, train.lr_schedule,
                                                                                 train.warmup_steps)
    if train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], train.max_grad_norm)


def _run_steps(peft_model: Any, base: BaseModel, data: Tokenized, cfg: TrainerSettings, opt: torch.optim.Optimizer,
               pruner: PruneAndTune | None, n_steps: int, seed: int,
               pruned_at: Masks | None = None) -> tuple[list[float], int, float]:
    """The local optimizer steps; returns (per-step losses, tokens processed, wall seconds). With a
    pruner, ``pruned_at`` (-1 = kept) records the step after which each unit was pruned."""
    log_prior = None
    if base.config.task == "classification" and cfg.train.logit_adjustment > 0:
        log_prior = cfg.train.logit_adjustment * label_log_prior(data.labels or [], base.config.num_labels)
        log_prior = log_prior.to(base.device)
    gen = torch.Generator().manual_seed(seed)
    pad_id = base.tokenizer.pad_token_id
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout draws from the global generator
        for step, idx in enumerate(batches(len(data), cfg.train.batch_size, n_steps, gen), start=1):
            batch = {k: v.to(base.device) for k, v in collate(data, idx, pad_id, base.config.task,
                                                                   cfg.train.loss_on).items()}
            tokens += batch["input_ids"].numel()
            loss = _loss(peft_model, base, batch, cfg, log_prior)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if pruner is not None:
                pruner.observe()
            _before_step(opt, cfg, step - 1, n_steps)
            opt.step()
            if pruner is not None:
                pruner.after_step(step)
                if pruned_at is not None:
                    _record_pruning(pruned_at, pruner.masks, step)
            losses.append(float(loss.detach()))
    return losses, tokens, time.perf_counter() - t0


def train_local(base: BaseModel, state: GlobalAdapter, rank: int, data: Tokenized, cfg: TrainerSettings,
                *, train_a: bool = True, seed: int = 0, prune: PruneSpec | None = None,
                masks: Masks | None = None, scores: dict[int, dict[str, torch.Tensor]] | None = None,
                steps: int | None = None) -> LocalResult:
    """Train a rank-``rank`` adapter started from ``state`` for ``cfg.train.local_steps`` steps.

    With ``prune``, the client prunes toward ``prune.target`` while it trains (prune-and-
    tune), starting from its previous ``masks`` and importance ``scores``; pruned
    structures stay masked (``masks`` without ``prune`` are applied but not extended).
    """
    if len(data) == 0:
        raise ValueError("client has no training examples")
    if state.adapter and adapter_rank(state.adapter) != rank:
        raise ValueError(f"payload adapter rank {adapter_rank(state.adapter)} != assigned rank {rank}")
    own_head = head_state(base)
    peft_model, handles = _prepare(base, state, rank, cfg)
    inner = peft_model.base_model.model
    n_steps = steps or cfg.train.local_steps
    pruner = None
    try:
        opt = local_optimizer(_trainable(inner, base, train_a), cfg.train, rank)
        if prune is not None or masks is not None:
            pruner = PruneAndTune(inner, lora_layers(peft_model), model_structure(inner),
                                  prune or PruneSpec(target=0.0), n_steps, masks=masks, scores=scores, seed=seed)
            pruner.enforce()
        if cfg.train.gradient_checkpointing:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            inner.enable_input_require_grads()
        peft_model.train()
        pruned_at = None
        if pruner is not None:
            pruned_at = {layer: {k: torch.where(t, -1, 0).to(torch.int32) for k, t in m.items()}
                         for layer, m in pruner.masks.items()}
        losses, tokens, elapsed = _run_steps(peft_model, base, data, cfg, opt, pruner, n_steps, seed, pruned_at)
        factors = read_factors(peft_model)
        head = {n: p.detach().float().cpu().clone() for n, p in inner.named_parameters() if n in base.head_names}
    finally:
        if pruner is not None:
            pruner.close()
        if cfg.train.gradient_checkpointing:
            inner.gradient_checkpointing_disable()
            inner.disable_input_require_grads()
        _release(peft_model, base, handles, own_head)
    k = max(1, len(losses) // 4)
    result = LocalResult(factors=factors, head=head, train_loss=sum(losses) / len(losses), num_examples=len(data),
                         train_time_s=elapsed, steps=len(losses), tokens=tokens,
                         loss_start=sum(losses[:k]) / k, loss_end=sum(losses[-k:]) / k)
    if pruner is not None:
        result.masks, result.scores, result.pruned_at = pruner.masks, pruner.scores, pruned_at
        result.sparsity = structural_sparsity(pruner.masks, pruner.spec.skip_layers)
        result.param_sparsity = sparsity(pruner.structure, pruner.masks, base.model.config.hidden_size)
    return result


def _record_pruning(pruned_at: Masks, masks: Masks, step: int) -> None:
    """Mark the units ``masks`` removed since the last step as pruned after ``step``."""
    for layer, m in masks.items():
        for kind, keep in m.items():
            at = pruned_at[layer][kind]
            at[(~keep) & (at < 0)] = step


@torch.no_grad()
def evaluate_global(base: BaseModel, state: GlobalAdapter, data: Tokenized, cfg: TrainerSettings,
                    masks: Masks | None = None) -> dict[str, float]:
    """Loss and accuracy (classification) or loss and perplexity (causal LM) of a global state
    (with ``masks``: of the pruned model those masks describe)."""
    rank = adapter_rank(state.adapter) or 1
    own_head = head_state(base)
    peft_model, handles = _prepare(base, state, rank, cfg)
    if masks is not None:
        handles = handles + apply_masks(peft_model.base_model.model, model_structure(base.model), masks)
    try:
        peft_model.eval()
        pad_id = base.tokenizer.pad_token_id
        total_loss, total_tokens, correct = 0.0, 0, 0
        bs = cfg.train.eval_batch_size
        for start in range(0, len(data), bs):
            idx = list(range(start, min(start + bs, len(data))))
            batch = {k: v.to(base.device) for k, v in collate(data, idx, pad_id, base.config.task,
                                                                   cfg.train.loss_on).items()}
            out = peft_model(**batch)
            if base.config.task == "classification":
                total_loss += float(out.loss) * len(idx)
                total_tokens += len(idx)
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            else:
                n_tok = int((batch["labels"][:, 1:] != -100).sum())
                total_loss += float(out.loss) * n_tok
                total_tokens += n_tok
    finally:
        _release(peft_model, base, handles, own_head)
    loss = total_loss / max(total_tokens, 1)
    if base.config.task == "classification":
        return {"eval_loss": loss, "eval_accuracy": correct / max(len(data), 1)}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def lora_shapes(base: BaseModel, cfg: TrainerSettings) -> dict[str, tuple[int, int]]:
    """(out, in) of every module LoRA targets in this base model."""
    peft_model = attach_lora(base, 1, cfg.lora, cfg.prunes)
    try:
        return module_shapes(peft_model)
    finally:
        detach_lora(peft_model, base)


def head_state(base: BaseModel) -> dict[str, torch.Tensor]:
    params = dict(base.model.named_parameters())
    return {n: params[n].detach().float().cpu().clone() for n in base.head_names}
