"""fedtune's client trainer against a hand-written transformers + peft loop, side by side.

For a randomly initialised Llama-3.2-1B-shaped model (``--shape 1b``: 16 layers, hidden 2048,
32 heads / 8 KV heads, FFN 8192, vocabulary 128,256), LoRA r=16 on every linear layer of the
decoder, batches of 8 x 1024 tokens and AdamW, it measures tokens/s and peak GPU memory of

- the bare loop a user would write: ``get_peft_model`` + ``model(input_ids, labels=...)`` +
  ``loss.backward()`` + ``AdamW.step()``, and
- fedtune's client trainer, :func:`fedtune.training.local.train_local` (the code a client runs in a
  federation: LoRA injected into the shared base model, chunked vocabulary cross-entropy),

for a bf16 base, NF4 and int8 bases (bitsandbytes) and a 50%-pruned bf16 base (half the KV
groups and FFN channels sliced away), in the same process, one after the other. It needs
torch, transformers, peft (and bitsandbytes for NF4/int8) but neither flwr nor ray. It prints
one JSON object and writes it to ``--out``.

    python simulations/bench/gpu_client_step.py                                  # the GPU run (< 5 min)
    python simulations/bench/gpu_client_step.py --shape small --device cpu \\
        --out simulations/results/gpu_client_step_cpu.json                       # the CPU side, small shape

``FEDTUNE_BENCH_CHUNK`` sets fedtune's ``train.loss_chunk_tokens`` (default 1024; the fused
chunked cross-entropy runs when a batch holds more tokens than one chunk, as 8 x 1024 does).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, batch=8, seq=1024),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000, batch=4, seq=256),
    # SmolLM2-135M (30 layers, hidden 576, 9 heads / 3 KV heads, FFN 1536, vocabulary 49,152)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, batch=8, seq=512),
    # a toy for CPU dry runs (scripts/gpu_check.sh --cpu), SmolLM2's vocabulary
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, batch=2, seq=64),
}

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched on
# torch.cuda.get_device_name(); MFU is reported against this peak and against a measured bf16 matmul.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.1, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if device == "cuda" else None


def llama_config(shape: dict, dtype: torch.dtype):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq")},
                      max_position_embeddings=max(2048, shape["seq"]), tie_word_embeddings=True,
                      rope_theta=500000.0, attn_implementation="sdpa")
    cfg.torch_dtype = dtype
    return cfg


def build_model(base: str, shape: dict, device: str, dtype: torch.dtype, tmp: Path):
    """A seeded random Llama of ``shape`` as the requested base, on ``device``."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(shape, dtype)
    if base in ("nf4", "int8"):
        ckpt = tmp / "ckpt"
        if not (ckpt / "config.json").exists():
            with torch.device(device):
                LlamaForCausalLM(cfg).to(dtype).save_pretrained(ckpt)
            reset_peak(device)
        q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                bnb_4bit_use_double_quant=True) if base == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs = {"device_map": {"": 0}} if device == "cuda" else {}
        model = LlamaForCausalLM.from_pretrained(ckpt, quantization_config=q, dtype=dtype, **kwargs)
        if device == "cpu":
            for m in model.modules():  # the AVX512-BF16 repacking trap (STACK.md)
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = False
    else:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
        if base == "pruned50":
            from fedtune.pruning.importance import prune_step
            from fedtune.pruning.slicing import slice_model
            from fedtune.pruning.structure import full_masks, model_structure

            structure = model_structure(model)
            gen = torch.Generator().manual_seed(1)
            scores = {ls.layer: {"attn": torch.rand(ls.num_units, generator=gen),
                                 "ffn": torch.rand(ls.ffn_dim, generator=gen)} for ls in structure}
            slice_model(model, structure, prune_step(full_masks(structure), scores, 0.5))
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_flops_per_token(model, seq: int, rank: int = 16) -> dict:
    """Model FLOPs of one trained token (forward + backward), read off the model's linear layers.

    A frozen base needs no weight gradients: its linears cost 2N (forward) + 2N (input gradient);
    the LoRA factors (r x (in + out) per targeted linear) cost the full 6 per parameter; attention's
    score and value products cost 12 x layers x seq x attention width per token (PaLM's count, causal
    masking not subtracted). ``conventional_6n`` is the full fine-tuning count (6N + attention) that
    MFU figures are usually quoted in. Quantized linears count as their float shapes (bf16 compute)."""
    linear = attention = lora = 0
    for name, m in model.named_modules():
        if type(m).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt") or "lora_" in name:
            continue
        linear += m.in_features * m.out_features
        if name.split(".")[-1] in TARGETS:
            lora += rank * (m.in_features + m.out_features)
        if name.endswith("q_proj"):
            attention += 12 * seq * m.out_features
    return {"lora_training": 4 * linear + 6 * lora + attention, "conventional_6n": 6 * linear + attention,
            "linear_params": linear}


def peak_tflops(device: str) -> dict:
    """The bf16 peak MFU is measured against: the data sheet's (by device name), and what a large
    bf16 matmul reaches here (8192^3 on a GPU; fp32 1024^3 on a CPU, which has no data-sheet entry)."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        sheet = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        n, dtype, reps = 8192, torch.bfloat16, 10
    else:
        name, sheet, n, dtype, reps = "cpu", None, 1024, torch.float32, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    measured = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    del a, b
    reset_peak(device)
    return {"device_name": name, "datasheet_bf16_dense_tflops": sheet,
            "measured_matmul_tflops": round(measured, 2), "measured_matmul": f"{n}^3 {str(dtype).split('.')[-1]}",
            "mfu_peak_tflops": sheet or round(measured, 2),
            "mfu_peak_source": "data sheet (dense bf16)" if sheet else "measured matmul (no data-sheet entry)"}


def mfu_fields(tokens_per_s: float, bare_tokens_per_s: float, flops: dict, peak: dict) -> dict:
    achieved = tokens_per_s * flops["lora_training"] / 1e12
    bare = bare_tokens_per_s * flops["lora_training"] / 1e12
    return {"model_tflop_per_token": flops["lora_training"] / 1e12, "achieved_tflops": round(achieved, 3),
            "mfu": round(achieved / peak["mfu_peak_tflops"], 4), "bare_mfu": round(bare / peak["mfu_peak_tflops"], 4),
            "mfu_vs_measured_matmul": round(achieved / peak["measured_matmul_tflops"], 4),
            "mfu_6n": round(tokens_per_s * flops["conventional_6n"] / 1e12 / peak["mfu_peak_tflops"], 4)}


def batches(shape: dict, steps: int, vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (shape["batch"], shape["seq"]), generator=gen) for _ in range(steps)]


def bare_loop(model, shape: dict, device: str, steps: int, warmup: int, lr: float) -> dict:
    """What a user writes by hand with transformers + peft."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    data = batches(shape, warmup + steps, model.config.vocab_size, 2)
    reset_peak(device)
    t0 = 0.0
    for i, x in enumerate(data):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        x = x.to(device)
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # a user logs the loss: one sync per step, as fedtune does
    sync(device)
    elapsed = time.perf_counter() - t0
    out = {"tokens_per_s": round(steps * shape["batch"] * shape["seq"] / elapsed, 1), "peak_mem_gb": peak_gb(device)}
    peft_model.unload()
    del opt, peft_model
    return out


def fedtune_loop(model, base_name: str, shape: dict, device: str, steps: int, warmup: int, lr: float) -> dict:
    """fedtune's client trainer (fedtune.training.local.train_local) on the same model."""
    from fedtune.core.config import config_from_dict
    from fedtune.data.batching import Tokenized
    from fedtune.lora.factors import GlobalAdapter
    from fedtune.models.loading import BaseModel
    from fedtune.training.local import train_local

    cfg = config_from_dict({
        "model": {"name": f"bench-{base_name}", "task": "causal-lm", "max_length": shape["seq"]},
        "lora": {"ranks": [16], "alpha": 32.0, "target_modules": TARGETS},
        "train": {"batch_size": shape["batch"], "learning_rate": lr, "local_steps": steps,
                  "loss_chunk_tokens": int(os.environ.get("FEDTUNE_BENCH_CHUNK", "1024")),
                  "num_threads": max(1, torch.get_num_threads())}})
    base = BaseModel(model=model, tokenizer=SimpleNamespace(pad_token_id=0), config=cfg.model, head_names=[],
                     architecture="llama")
    n = (warmup + steps) * shape["batch"]
    data = Tokenized(input_ids=[row.tolist() for x in batches(shape, warmup + steps, model.config.vocab_size, 2)
                                for row in x], labels=None)
    state = GlobalAdapter(adapter={}, head={})
    assert len(data) == n
    train_local(base, state, 16, data, cfg, seed=0, steps=warmup)  # warm-up (kernels, allocator)
    reset_peak(device)
    result = train_local(base, state, 16, data, cfg, seed=1, steps=steps)
    return {"tokens_per_s": round(result.tokens / result.train_time_s, 1), "peak_mem_gb": peak_gb(device),
            "loss": round(result.train_loss, 4)}


SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, batch=8, seq=512)


def capacity(device: str, dtype: torch.dtype, tmp: Path) -> list[dict]:
    """How many simulation workers fit on this GPU at once: each holds one NF4 base and trains one
    client at a time (fedtune's trainer, r=16, batch 8 x 512), so a worker needs the base plus one
    client's training peak. Measured peak per worker -> workers = floor(0.9 x GPU memory / peak)."""
    rows = []
    total = torch.cuda.get_device_properties(0).total_memory / 1e9
    for name, shape in (("smollm2-135m-shape", SMOLLM2), ("llama-1b-shape", {**SHAPES["1b"], "batch": 8, "seq": 512})):
        sub_tmp = tmp / name
        sub_tmp.mkdir(exist_ok=True)
        reset_peak(device)
        model = build_model("nf4", shape, device, dtype, sub_tmp)
        base_gb = torch.cuda.memory_allocated() / 1e9
        fedtune_loop(model, "nf4", shape, device, steps=2, warmup=1, lr=1e-4)
        peak = torch.cuda.max_memory_allocated() / 1e9
        rows.append({"model": name, "base_nf4_gb": round(base_gb, 3), "worker_peak_gb": round(peak, 3),
                     "gpu_memory_gb": round(total, 1), "workers_per_gpu": int(0.9 * total // peak)})
        print(json.dumps(rows[-1]), flush=True)
        del model
        reset_peak(device)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bases", default="bf16,nf4,int8,pruned50")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=1, help="alternate bare/fedtune this many times; keep the best")
    ap.add_argument("--no-capacity", action="store_true", help="skip the workers-per-GPU measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "gpu_client_step.json")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    results = []
    peak = peak_tflops(args.device)
    print(json.dumps({"mfu_peak": peak}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for base_name in args.bases.split(","):
            if args.device == "cpu" and base_name == "bf16":
                base_name = "fp32"  # CPU matmuls in fp32: the same comparison at the CPU's native width
            model = build_model(base_name, shape, args.device, dtype, Path(tmp))
            flops = train_flops_per_token(model, shape["seq"])
            bare = ours = None
            for _ in range(args.repeats):  # alternate, keep each loop's best: a shared machine's noise
                b = bare_loop(model, shape, args.device, args.steps, args.warmup, args.lr)
                o = fedtune_loop(model, base_name, shape, args.device, args.steps, args.warmup, args.lr)
                bare = b if bare is None or b["tokens_per_s"] > bare["tokens_per_s"] else bare
                ours = o if ours is None or o["tokens_per_s"] > ours["tokens_per_s"] else ours
            row = {"base": base_name, "tokens_per_s": ours["tokens_per_s"], "bare_tokens_per_s": bare["tokens_per_s"],
                   "ratio_vs_bare": round(ours["tokens_per_s"] / bare["tokens_per_s"], 3),
                   "peak_mem_gb": ours["peak_mem_gb"], "bare_peak_mem_gb": bare["peak_mem_gb"],
                   "params": sum(p.numel() for p in model.parameters()),
                   **mfu_fields(ours["tokens_per_s"], bare["tokens_per_s"], flops, peak)}
            print(json.dumps(row), flush=True)
            results.append(row)
            del model
            reset_peak(args.device)
        fit = capacity(args.device, dtype, Path(tmp)) if args.device == "cuda" and not args.no_capacity else None
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    out = {"device": device, "shape": args.shape, "mfu_peak": peak,
           "mfu_note": "mfu = tokens/s x model FLOPs per trained token / mfu_peak_tflops; FLOPs per token for a"
                       " frozen base with LoRA: 4 x linear params + 6 x LoRA params + 12 x layers x seq x attention"
                       " width (mfu_6n: the full fine-tuning count 6N + attention)", "batch": shape["batch"], "seq": shape["seq"], "lora_rank": 16,
           "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "results": results, "capacity": fit,
           "versions": {"torch": torch.__version__, **_versions()},
           "command": "python simulations/bench/gpu_client_step.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    main()
