"""Check that two runs of one config computed the same thing: ``torch.equal`` adapters and
identical ``metrics.jsonl`` apart from timings and runtime ids (node ids, worker names).

Usage: python scripts/same_run.py RUN_A RUN_B [RUN_A2 RUN_B2 ...]  (exit 1 on a difference)

Used to show that a change which should not alter behaviour (a refactoring) does not: run the
smoke configs on both trees, e.g. with ``git worktree add /tmp/before <ref>`` and
``python -m fedtune simulate --config simulations/smoke.toml --out ...`` in each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# timings, and the ids the runtime assigns (Flower node ids, Ray worker names)
TIMING_KEYS = {"wall_time_s", "eval_time_s", "reply_s", "process_s", "setup_s", "train_time_s", "worker", "node_id"}


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def compare(a: Path, b: Path) -> list[str]:
    problems = []
    ta, tb = load_file(str(a / "adapter" / "adapter_model.safetensors")), load_file(str(b / "adapter" / "adapter_model.safetensors"))
    if set(ta) != set(tb):
        problems.append(f"adapter tensors differ in names: {sorted(set(ta) ^ set(tb))[:4]}")
    problems += [f"adapter tensor {k} differs" for k in sorted(set(ta) & set(tb)) if not torch.equal(ta[k], tb[k])]
    ma = [_strip(json.loads(x)) for x in (a / "metrics.jsonl").read_text().splitlines() if x.strip()]
    mb = [_strip(json.loads(x)) for x in (b / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if len(ma) != len(mb):
        problems.append(f"metrics.jsonl: {len(ma)} vs {len(mb)} rounds")
    for ra, rb in zip(ma, mb):
        if ra != rb:
            keys = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
            problems.append(f"metrics.jsonl round {ra.get('round')}: differs in {keys}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__)
        return 2
    for run in map(Path, argv):
        for part in ("adapter/adapter_model.safetensors", "metrics.jsonl"):
            if not (run / part).is_file():
                print(f"same_run: {run}: no {part} (not a finished fedtune run directory)", file=sys.stderr)
                return 2
    failed = False
    for a, b in zip(argv[::2], argv[1::2]):
        problems = compare(Path(a), Path(b))
        print(f"{a} vs {b}: " + ("same adapters (torch.equal) and metrics apart from timings" if not problems
                                  else "DIFFERENT\n  " + "\n  ".join(problems)))
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
