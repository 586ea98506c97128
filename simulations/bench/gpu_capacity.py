"""How many NF4 clients fit side by side on one GPU under fedtune's per-process memory caps.

``simulation.gpu_fraction_by_device`` gives each device class a share f of the GPU; a client of
that class trains in a process capped with ``torch.cuda.set_per_process_memory_fraction(f)``
(clients/local.py). For each model shape (randomly initialised, NF4 base via bitsandbytes, LoRA
r=16 on every linear layer, fedtune's trainer ``train_local``), this driver launches
``floor(1 / f)`` worker processes side by side under the cap f of each device class in turn
(smallest share first), lets them load the model, waits until all are loaded (a barrier, so their
training peaks overlap), trains a few steps in each and records which fit and which ran out of
memory. A shape's ``workers_per_gpu`` is the count of the first wave in which every worker fit.
The CUDA context of each process (about 0.5 GB) is not counted by the cap: a wave of 1 / f workers
can fail on memory although each stayed under its cap, and that is reported as it happens.

    python simulations/bench/gpu_capacity.py --config simulations/gpu_check.toml --out gpu_capacity.json
    python simulations/bench/gpu_capacity.py --device cpu --shapes tiny --max-workers 2 ...   # a dry run

On a CPU the caps are not enforced (no CUDA allocator): the waves run, so the code path is proven.
It needs torch, transformers, peft and bitsandbytes, not flwr or ray. Subcommands ``checkpoint``
(write a randomly initialised checkpoint of a shape, optionally with a tokenizer, as a local
``model.name`` for fedtune) and ``worker`` (one capped worker; used internally).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

SHAPE_NAMES = {"smollm2": "smollm2-135m-shape", "1b": "llama-3.2-1b-shape", "tiny": "tiny-shape",
               "small": "small-shape"}


def write_checkpoint(shape_name: str, out: Path, device: str, dtype: str, tokenizer: Path | None) -> Path:
    """A seeded random Llama of ``shape_name`` saved as safetensors (+ the tokenizer, if given)."""
    import torch
    from gpu_client_step import SHAPES, llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    td = getattr(torch, dtype)
    cfg = llama_config(SHAPES[shape_name], td)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(td)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer))
        if len(tok) > cfg.vocab_size:
            raise SystemExit(f"tokenizer {tokenizer} has {len(tok)} tokens > the shape's vocabulary {cfg.vocab_size}")
        model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tok.save_pretrained(str(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def worker(args: argparse.Namespace) -> None:
    """One client process: cap, load the NF4 base, wait for the others, train, write a result."""
    result: dict = {"worker": args.index, "ok": False}
    t0 = time.perf_counter()
    try:
        import torch

        if args.device == "cuda":
            torch.cuda.set_per_process_memory_fraction(args.fraction)
        torch.set_num_threads(max(1, args.threads))
        from gpu_client_step import SHAPES, build_model, fedtune_loop

        shape = {**SHAPES[args.shape], "batch": args.batch, "seq": args.seq}
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model = build_model("nf4", shape, args.device, dtype, Path(args.ckpt).parent)
        result["load_s"] = round(time.perf_counter() - t0, 1)
        if args.device == "cuda":
            result["base_gb"] = round(torch.cuda.memory_allocated() / 1e9, 3)
        Path(args.result).with_suffix(".ready").touch()
        deadline = time.time() + args.barrier_s  # train together: wait until every worker has loaded
        while time.time() < deadline and len(list(Path(args.result).parent.glob("*.ready"))) < args.workers:
            time.sleep(0.2)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run = fedtune_loop(model, "nf4", shape, args.device, steps=args.steps, warmup=1, lr=1e-4)
        result.update(ok=True, tokens_per_s=run["tokens_per_s"], loss=run["loss"])
        if args.device == "cuda":
            result.update(peak_allocated_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3),
                          peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 3),
                          gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 1e9, 2))
    except BaseException as exc:  # noqa: BLE001 - an OOM is a result here, not a failure of the driver
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        result["oom"] = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
        Path(args.result).with_suffix(".ready").touch()  # a failed load must not hold the others back
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(args.result).write_text(json.dumps(result))


def wave(shape: str, ckpt: Path, fraction: float, n: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """``n`` workers side by side, each capped at ``fraction``; their results (one per worker)."""
    wave_dir = Path(tempfile.mkdtemp(prefix=f"{shape}-{fraction}-", dir=tmp))
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = []
    for i in range(n):
        cmd = [sys.executable, __file__, "worker", "--shape", shape, "--ckpt", str(ckpt), "--fraction", str(fraction),
               "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--workers", str(n), "--index", str(i), "--threads", str(threads), "--barrier-s", str(args.barrier_s),
               "--result", str(wave_dir / f"w{i}.json")]
        log = open(wave_dir / f"w{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    deadline = time.time() + args.wave_timeout_s
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
    out = []
    for i, (proc, _) in enumerate(procs):
        path = wave_dir / f"w{i}.json"
        if path.is_file():
            out.append(json.loads(path.read_text()))
        else:  # killed by the timeout or crashed (the driver may have killed a process out of GPU memory)
            tail = (wave_dir / f"w{i}.log").read_text(errors="replace").strip().splitlines()[-3:]
            out.append({"worker": i, "ok": False, "error": f"no result (exit {proc.returncode}): {' | '.join(tail)[:300]}",
                        "oom": "out of memory" in " ".join(tail).lower()})
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        ap = argparse.ArgumentParser()
        for name, tp in (("--shape", str), ("--ckpt", str), ("--fraction", float), ("--device", str), ("--batch", int),
                         ("--seq", int), ("--steps", int), ("--workers", int), ("--index", int), ("--threads", int),
                         ("--barrier-s", float), ("--result", str)):
            ap.add_argument(name, type=tp, required=True)
        return worker(ap.parse_args(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "checkpoint":
        ap = argparse.ArgumentParser(description="write a randomly initialised Llama checkpoint of a shape")
        ap.add_argument("--shape", required=True)
        ap.add_argument("--out", type=Path, required=True)
        ap.add_argument("--device", default="cpu")
        ap.add_argument("--dtype", default="bfloat16")
        ap.add_argument("--tokenizer", type=Path, help="a tokenizer directory to save with it")
        a = ap.parse_args(sys.argv[2:])
        print(write_checkpoint(a.shape, a.out, a.device, a.dtype, a.tokenizer))
        return None

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "simulations" / "gpu_check.toml",
                    help="experiment TOML whose simulation.gpu_fraction_by_device gives the caps")
    ap.add_argument("--shapes", default="smollm2,1b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-workers", type=int, default=16, help="cap on a wave's size (CPU cores for the imports)")
    ap.add_argument("--barrier-s", type=float, default=120.0)
    ap.add_argument("--wave-timeout-s", type=float, default=150.0)
    ap.add_argument("--budget-s", type=float, default=0.0, help="start no wave after this many seconds (0: none)")
    ap.add_argument("--out", type=Path, default=Path("gpu_capacity.json"))
    args = ap.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fractions = tomllib.loads(args.config.read_text()).get("simulation", {}).get("gpu_fraction_by_device", {})
    if not fractions:
        raise SystemExit(f"{args.config}: no simulation.gpu_fraction_by_device to measure")
    classes = sorted(fractions.items(), key=lambda kv: kv[1])  # smallest share (most workers) first
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    t_start = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpucap-") as tmp_s:
        tmp = Path(tmp_s)
        for shape in args.shapes.split(","):
            ckpt = tmp / shape / "ckpt"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "checkpoint", "--shape", shape, "--out", str(ckpt),
                            "--device", args.device, "--dtype", "bfloat16" if args.device == "cuda" else "float32"],
                           check=True, stdout=subprocess.DEVNULL)
            row: dict = {"model": SHAPE_NAMES.get(shape, shape), "shape": shape, "quantization": "nf4",
                         "batch": args.batch, "seq": args.seq, "checkpoint_s": round(time.perf_counter() - t0, 1),
                         "waves": [], "workers_per_gpu": 0, "device_class": None}
            for cls, f in classes:
                if args.budget_s and time.time() - t_start > args.budget_s:
                    row["waves"].append({"device_class": cls, "skipped": "time budget spent"})
                    continue
                n_caps = math.floor(1.0 / f + 1e-9)
                n = min(n_caps, args.max_workers)
                t0 = time.perf_counter()
                workers = wave(shape, ckpt, f, n, args, tmp)
                ok = [w for w in workers if w["ok"]]
                w_row = {"device_class": cls, "fraction": f, "caps_per_gpu": n_caps, "workers": n, "fit": len(ok),
                         "oom": sum(1 for w in workers if w.get("oom")), "wall_s": round(time.perf_counter() - t0, 1),
                         "cap_gb": round(f * ok[0]["gpu_memory_gb"], 2) if ok and "gpu_memory_gb" in ok[0] else None,
                         "clipped_by_max_workers": n < n_caps,
                         "max_peak_reserved_gb": max((w["peak_reserved_gb"] for w in ok if "peak_reserved_gb" in w),
                                                     default=None),
                         "max_peak_allocated_gb": max((w["peak_allocated_gb"] for w in ok if "peak_allocated_gb" in w),
                                                      default=None),
                         "tokens_per_s_each": [w["tokens_per_s"] for w in ok],
                         "aggregate_tokens_per_s": round(sum(w["tokens_per_s"] for w in ok), 1),
                         "errors": sorted({w["error"] for w in workers if not w["ok"]})[:3]}
                row["waves"].append(w_row)
                print(json.dumps({"model": row["model"], **w_row}), flush=True)
                if ok and len(ok) == n:  # every worker fit: larger shares fit fewer, stop here
                    row["workers_per_gpu"], row["device_class"] = n, cls
                    peak = w_row["max_peak_reserved_gb"]
                    if peak and ok[0].get("gpu_memory_gb"):
                        row["estimated_workers_by_peak"] = int(0.9 * ok[0]["gpu_memory_gb"] // (peak + 0.5))
                    break
            rows.append(row)
    out = {"device": device_name, "caps_enforced": args.device == "cuda", "config": str(args.config),
           "gpu_fraction_by_device": fractions, "lora_rank": 16, "steps": args.steps, "results": rows,
           "note": "workers_per_gpu: the size of the first wave (smallest share first) in which every worker,"
                   " capped with torch.cuda.set_per_process_memory_fraction(share), loaded the NF4 base and trained;"
                   " estimated_workers_by_peak = floor(0.9 x GPU memory / (peak reserved + 0.5 GB CUDA context))",
           "command": "python simulations/bench/gpu_capacity.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return None


if __name__ == "__main__":
    main()
