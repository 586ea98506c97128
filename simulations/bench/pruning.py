"""Structured pruning benchmark: LoRA-guided importance against magnitude, random and Taylor.

MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes, one client holding the training split:
for each importance method and target sparsity (30%, 50% of each layer's heads and FFN
channels), prune-and-tune for ``--prune-steps`` (a pruning event every 20 steps on a
cubic schedule), then recover for ``--recover-steps`` with the masks fixed, and report the
held-out accuracy; every run takes the same number of optimizer steps as the unpruned
LoRA baseline. The pruning job comes from the ``[prune]`` settings (``PruneSpec.from_config``):
by default the first and last layers are skipped (``--set prune.skip_edge_layers=false`` prunes
them too). The pruned model is then exported (adapter merged, heads and channels
removed) and its CPU inference time measured against the unpruned merged model,
interleaved, single-threaded, batch 32 x 64 tokens.

    .venv/bin/python simulations/bench/pruning.py            # -> simulations/results/pruning.json
    .venv/bin/python simulations/bench/pruning.py --smollm2  # -> simulations/results/pruning_smollm2.json

``--smollm2``: SmolLM2-135M on the chatterbot Q/A corpus, 30% of the KV groups and FFN
channels pruned with LoRA recovery; perplexity before and after against the unpruned
fine-tuned model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def experiment(model: str, extra: list[str]) -> Any:
    from fedtune.core.config import config_from_dict

    task = "classification" if model == "minilm" else "causal-lm"
    dataset = "rotten-tomatoes" if model == "minilm" else "chatterbot"
    return config_from_dict({
        "model": {"name": model, "task": task, "max_length": 64},
        "lora": {"ranks": [8], "alpha": 16.0},
        "data": {"dataset": dataset, "partitioner": "iid", "eval_size": 400 if model == "minilm" else 200},
        "train": {"batch_size": 16 if model == "minilm" else 8, "learning_rate": 2e-3 if model == "minilm" else 5e-4,
                  "logit_adjustment": 0.0},
        "federation": {"num_clients": 1, "min_clients": 1},
        "prune": {"ratio": 0.5},  # enables LoRA on every prunable module
    }, extra)


def run_one(model: str, method: str | None, target: float, prune_steps: int, recover_steps: int,
            extra: list[str]) -> dict[str, Any]:
    """Train (and prune) one configuration; returns metrics and the final state and masks."""
    import torch

    from fedtune.core.protocol import PruneSpec
    from fedtune.data.batching import tokenize
    from fedtune.data.partition import cached_federated_data
    from fedtune.lora.factors import GlobalAdapter
    from fedtune.models.loading import cached_base_model
    from fedtune.pruning.structure import model_structure
    from fedtune.training.local import (
        evaluate_global,
        head_state,
        lora_shapes,
        train_local,
    )
    from strategies import HetLoRA

    torch.set_num_threads(1)
    cfg = experiment(model, extra)
    base = cached_base_model(cfg.model, cfg.seed)
    fed = cached_federated_data(cfg.data, cfg.model.task, 1, cfg.seed, cfg.model.num_labels)
    train = tokenize(fed.partition(0), base.tokenizer, cfg.model.task, cfg.model.max_length)
    ev = tokenize(fed.eval, base.tokenizer, cfg.model.task, cfg.model.max_length)
    strat = HetLoRA(cfg)
    state = strat.initial_state(lora_shapes(base, cfg), head_state(base))
    before = evaluate_global(base, state, ev, cfg)
    t0 = time.time()
    out: dict[str, Any] = {"method": method or "none", "target": target, "before": before}
    if method is None:  # the same two phases (optimizer restarted between them), without pruning
        res = train_local(base, state, 8, train, cfg, seed=1, steps=prune_steps)
        state = GlobalAdapter(adapter=res.factors, head=res.head)
        res = train_local(base, state, 8, train, cfg, seed=2, steps=recover_steps)
        state = GlobalAdapter(adapter=res.factors, head=res.head)
        masks = None
    else:
        # the server's job for this target from the [prune] settings (interval 20, ema, skip_edge_layers, ...)
        num_layers = len(model_structure(base.model))
        spec = dataclasses.replace(PruneSpec.from_config(cfg.prune, target, num_layers), importance=method)
        out["skip_layers"] = list(spec.skip_layers)
        res = train_local(base, state, 8, train, cfg, seed=1, prune=spec, steps=prune_steps)
        state = GlobalAdapter(adapter=res.factors, head=res.head)
        out["after_pruning"] = evaluate_global(base, state, ev, cfg, masks=res.masks)
        masks = res.masks
        res = train_local(base, state, 8, train, cfg, seed=2, masks=masks, steps=recover_steps)
        state = GlobalAdapter(adapter=res.factors, head=res.head)
        out["sparsity"] = res.sparsity
    out["after"] = evaluate_global(base, state, ev, cfg, masks=masks)
    out["train_s"] = round(time.time() - t0, 1)
    out["state"], out["masks"] = state, masks
    print(f"  {out['method']:9s} target {target:.2f}: {out['after']}  ({out['train_s']}s)", flush=True)
    return out


def inference_time_ratio(model_a: Any, model_b: Any, vocab: int, repeats: int = 15) -> tuple[float, float, float]:
    """Median forward time of b over a, interleaved, one thread, batch 32 x 64 tokens."""
    import torch

    torch.set_num_threads(1)
    ids = torch.randint(1000, vocab - 1, (32, 64), generator=torch.Generator().manual_seed(0))
    ta, tb = [], []
    with torch.no_grad():
        for m in (model_a, model_b):
            m(input_ids=ids)  # warm-up
        for _ in range(repeats):
            for m, acc in ((model_a, ta), (model_b, tb)):
                t0 = time.perf_counter()
                m(input_ids=ids)
                acc.append(time.perf_counter() - t0)
    return statistics.median(tb) / statistics.median(ta), statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", action="store_true", help="the SmolLM2-135M perplexity run instead")
    ap.add_argument("--methods", default="lora,magnitude,random,taylor")
    ap.add_argument("--targets", default="0.3,0.5")
    ap.add_argument("--prune-steps", type=int, default=100)
    ap.add_argument("--recover-steps", type=int, default=60)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--set", dest="extra", action="append", default=[])
    ap.add_argument("--before", type=Path, help="an earlier results file, kept under \"before\" with the change "
                    "of each figure under \"effect\" (before -> after)")
    args = ap.parse_args()

    from fedtune.pruning.export import export_pruned_model, load_pruned_model

    model = "smollm2-135m" if args.smollm2 else "minilm"
    out_path = args.out or ROOT / "simulations" / "results" / ("pruning_smollm2.json" if args.smollm2 else "pruning.json")
    if args.smollm2:
        jobs = [(model, None, 0.0), (model, "lora", 0.3)]
    else:
        jobs = [(model, None, 0.0)] + [(model, m, float(t)) for t in args.targets.split(",")
                                       for m in args.methods.split(",")]
    print(f"{model}: {len(jobs)} runs, {args.prune_steps} + {args.recover_steps} steps each, {args.jobs} processes")
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, m, meth, t, args.prune_steps, args.recover_steps, args.extra)
                   for m, meth, t in jobs]
        runs = [f.result() for f in futures]
    cfg = experiment(model, args.extra)
    unpruned = runs[0]
    metric = "eval_accuracy" if not args.smollm2 else "eval_perplexity"
    result: dict[str, Any] = {
        "model": model, "metric": metric, "steps": args.prune_steps + args.recover_steps,
        "prune_steps": args.prune_steps, "recover_steps": args.recover_steps, "interval": 20,
        "before_training": unpruned["before"][metric],
        "unpruned": {metric: unpruned["after"][metric]},
    }
    with tempfile.TemporaryDirectory() as tmp:
        from fedtune.models.loading import cached_base_model
        from fedtune.pruning.structure import full_masks, model_structure

        ref_dir = Path(tmp) / "unpruned"  # runs[0] is the unpruned baseline: export it with all-kept masks
        structure = model_structure(cached_base_model(cfg.model, cfg.seed).model)
        export_pruned_model(unpruned["state"], full_masks(structure), cfg, ref_dir)
        reference = load_pruned_model(ref_dir)
        vocab = reference.config.vocab_size
        for run in runs[1:]:
            d = Path(tmp) / f"{run['method']}-{run['target']}"
            info = export_pruned_model(run["state"], run["masks"], cfg, d)
            pruned = load_pruned_model(d)
            ratio, t_ref, t_pruned = inference_time_ratio(reference, pruned, vocab)
            entry = {
                metric: run["after"][metric],
                f"{metric}_before_recovery": run["after_pruning"][metric],
                "sparsity": round(run["sparsity"], 4),
                "param_ratio": round(info["params_after"] / info["params_before"], 4),
                "inference_time_ratio": round(ratio, 4),
                "inference_ms": {"unpruned": round(1000 * t_ref, 2), "pruned": round(1000 * t_pruned, 2)},
            }
            entry["skip_layers"] = run["skip_layers"]
            if not args.smollm2:
                entry["accuracy"] = entry.pop(metric)
                entry["accuracy_before_recovery"] = entry.pop(f"{metric}_before_recovery")
            result.setdefault(run["method"], {})[f"{run['target']:.1f}"] = entry
    if not args.smollm2:
        result["unpruned"] = {"accuracy": unpruned["after"]["eval_accuracy"]}
        result["before_training"] = unpruned["before"]["eval_accuracy"]
    result.update({
        "command": "python simulations/bench/pruning.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "wall_s": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d"),
    })
    if args.before is not None:
        result["before"] = before = json.loads(args.before.read_text())
        before.pop("before", None), before.pop("effect", None)
        keys = ("accuracy", "accuracy_before_recovery", metric, f"{metric}_before_recovery", "sparsity",
                "param_ratio", "inference_time_ratio")
        effect: dict[str, Any] = {"unpruned": [before.get("unpruned"), result["unpruned"]]}
        for method, entries in result.items():
            if isinstance(entries, dict) and method in before and method != "unpruned":
                effect[method] = {t: {k: [before[method][t][k], e[k]] for k in keys if k in e and k in before[method][t]}
                                  for t, e in entries.items() if t in before[method]}
        result["effect"] = effect
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
