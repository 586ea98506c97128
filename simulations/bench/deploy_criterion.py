"""How the deployment completion ranks units: held-out perplexity of SmolLM2-135M with a fraction of
every layer's FFN channels (and KV groups, where the fraction allows) pruned, no training after, by
weight magnitude, by Wanda-style |W| * ||x|| on one calibration batch from a client's own partition
(what fedtune/deployed.py uses), and at random.

    .venv/bin/python simulations/bench/deploy_criterion.py     # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from fedtune.core.config import config_from_dict
    from fedtune.data.batching import collate, tokenize
    from fedtune.data.partition import cached_federated_data
    from fedtune.lora.factors import GlobalAdapter
    from fedtune.models.loading import cached_base_model
    from fedtune.pruning.completion import complete_masks
    from fedtune.pruning.importance import prune_step
    from fedtune.pruning.structure import full_masks, model_structure
    from fedtune.training.local import evaluate_global, head_state, lora_shapes

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    cfg = config_from_dict({"model": {"name": "smollm2-135m", "task": "causal-lm", "max_length": 48},
                            "data": {"dataset": "chatterbot", "partitioner": "iid", "eval_size": 48},
                            "train": {"eval_batch_size": 16}, "prune": {"ratio": 0.3}})
    base = cached_base_model(cfg.model, 0)
    fed = cached_federated_data(cfg.data, "causal-lm", 8, 0, 2)
    held_out = tokenize(fed.eval, base.tokenizer, "causal-lm", 48)
    own = tokenize(fed.partition(0), base.tokenizer, "causal-lm", 48)
    calib = {k: v for k, v in collate(own, list(range(min(32, len(own)))), base.tokenizer.pad_token_id,
                                       "causal-lm").items() if k != "labels"}
    state = GlobalAdapter(adapter={m: (torch.zeros(4, i), torch.zeros(o, 4)) for m, (o, i) in lora_shapes(base, cfg).items()},
                          head=head_state(base))
    s = model_structure(base.model)
    gen = torch.Generator().manual_seed(0)
    out: dict = {"dense": evaluate_global(base, state, held_out, cfg)["eval_perplexity"], "by_ratio": {}}
    for ratio in (0.1, 0.3):
        rand = prune_step(full_masks(s), {ls.layer: {"attn": torch.rand(ls.num_units, generator=gen),
                                                     "ffn": torch.rand(ls.ffn_dim, generator=gen)} for ls in s}, ratio)
        masks = {"magnitude": complete_masks(base.model, s, state, full_masks(s), ratio),
                 "wanda (own data)": complete_masks(base.model, s, state, full_masks(s), ratio, calibration=[calib]),
                 "random": rand}
        out["by_ratio"][str(ratio)] = {k: round(evaluate_global(base, state, held_out, cfg, masks=m)["eval_perplexity"], 2)
                                       for k, m in masks.items()}
        print(ratio, out["by_ratio"][str(ratio)], flush=True)
    out.update(command="python simulations/bench/deploy_criterion.py", date=time.strftime("%Y-%m-%d"),
               machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               model="smollm2-135m", data="chatterbot, 48 held-out pairs, calibration: 32 pairs of client 0's partition")
    path = ROOT / "simulations" / "results" / "deploy_criterion.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
