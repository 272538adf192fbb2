#!/usr/bin/env bash
# GPU benchmark: selfkd's GPU-shaped kernels, then selfkd vs the Hugging Face stack (transformers + peft +
# TRL) on ONE H100/H200, bf16, the real Qwen3-Omni width with a few layers. Sized to finish in under
# 10 minutes (kernels ~2 min; bench_gkd: ~1 min checkpoint build, ~1 min loading, ~3 min timing).
#
#   bash bench/gpu.sh                 # writes $OUT/*.txt, bench_gkd_gpu.json ($OUT defaults to bench/out)
#   LAYERS=2 PROMPT=128 COMPLETION=128 bash bench/gpu.sh   # smaller, if time is short
#
# First the new paths, each capped and allowed to fail without stopping the rest:
#   moe_kernels  bench/bench_moe.py --kernels --device cuda: selfkd's MoE block at real width with LoRA r8
#                on the experts, per-expert loop vs grouped path (F.grouped_mm, what selfkd picks on CUDA
#                in bf16), LoRA on and off: grouped == loop check, aten ops and CUDA kernels per fwd+bwd
#                (profiler), time
#   attention    bench/bench_attention.py --device cuda: a left-padded prompt + right-padded completion
#                batch, SDPA with the boolean mask vs without (pads rolled last, is_causal): equal hidden
#                states and LoRA gradients, which SDPA kernels ran (FlashAttention unmasked?), time
#   simulated    python selfkd.py ... --simulate_gpu h100 for the checkpoint bench_gkd builds: the memory
#                plan, the simulated step's memory and predicted times, beside bench_gkd's measurements
#
# What bench_gkd measures (bench/bench_gkd.py --device cuda --dtype bfloat16 --real-width):
#   model    hidden 2048, 32/4 heads x 128, 128 experts top-8, expert intermediate 768, vocab 152064,
#            $LAYERS layers (default 4), LoRA r8 alpha16 on q,k,v,o + experts, random weights shared by both
#   step     one GKD step (off-policy and on-policy), median of 3 interleaved reps: completion tokens/s and
#            model FLOP utilisation against a measured 8192^3 bf16 torch.mm (same process)
#   memory   torch.cuda.max_memory_allocated over one step: selfkd, peer, peer with a separate teacher copy
#   loss     chunked GKD loss vs TRL's formula on materialised fp32 logits, 640 x 152064, fwd+bwd
#   gen      generate tokens/s, selfkd vs HF generate (KV cache), with and without LoRA
#   moe      one MoE block at real width: selfkd SparseMoE vs transformers' default experts backend
#            (grouped_mm) and eager, frozen weights, fwd and fwd+bwd
#
# Packages. A GPU machine may lack trl/datasets or have other versions than the CPU venv (transformers
# 5.24, peft 0.21.2, trl 1.16.0). To pin the versions, download the wheels once on a machine with network
# access into the repository root (.whl must be git-ignored):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.24.0 peft==0.21.2 trl==1.16.0 datasets dill multiprocess
# and copy .whl along with the checkout: this script installs them into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/out}
LAYERS=${LAYERS:-4}
PROMPT=${PROMPT:-256}
COMPLETION=${COMPLETION:-256}
REPS=${REPS:-3}
BUDGET_S=${BUDGET_S:-450}  # the benchmark's own wall-clock cap (gpu.sh total < 8 min)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u '+%Y-%m-%d %H:%M UTC'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PYTHON" - <<'EOF'
import importlib
for name in ("torch", "transformers", "peft", "trl", "safetensors", "tokenizers"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001
        print(f"{name} MISSING ({type(err).__name__}: {err})")
EOF
} 2>&1 | tee "$OUT/env.txt"

# selfkd's GPU-shaped kernels: the grouped MoE path and attention without a mask
timeout 150 "$PYTHON" bench/bench_moe.py --kernels --device cuda --dtype bfloat16 --tokens 1024 --reps 5 2>&1 \
  | tee "$OUT/moe_kernels_gpu.txt" || echo "bench_moe --kernels failed or timed out (exit $?)"
timeout 90 "$PYTHON" bench/bench_attention.py --device cuda --dtype bfloat16 --batch 4 --prompt 1024 \
  --completion 512 --layers 2 --reps 5 2>&1 | tee "$OUT/attention_gpu.txt" || echo "bench_attention failed (exit $?)"

# The checkpoint (random weights, released layout) is built on the GPU and cached under /tmp.
set -o pipefail
timeout "$BUDGET_S" "$PYTHON" bench/bench_gkd.py --device cuda --dtype bfloat16 --real-width --layers "$LAYERS" \
  --batch 4 --prompt "$PROMPT" --completion "$COMPLETION" --reps "$REPS" \
  --only step,memory,loss,gen,moe --no-gc-row --ckpt-dir /tmp/selfkd_bench \
  --json "$OUT/bench_gkd_gpu.json" 2>&1 | tee "$OUT/bench_gkd_gpu.txt" || echo "bench_gkd failed (exit $?)"

# The plan for the same checkpoint and batch on one GPU: the memory plan and the simulated step
# (simulate.py: memory per phase, launches, predicted step time on H100/H200), to compare with the
# measured step and memory above.
CKPT=/tmp/selfkd_bench/h2048-l${LAYERS}-e128k8-i768-v152064-bf16
timeout 180 "$PYTHON" selfkd.py --model "$CKPT" --dataset data/sample_alpaca.jsonl --torch_dtype bfloat16 \
  --per_device_train_batch_size 4 --max_length $((PROMPT + COMPLETION)) --max_completion_length "$COMPLETION" \
  --simulate_gpu h100 --world_size 1 2>&1 | tee "$OUT/simulated_gpu.txt" || echo "--simulate_gpu failed (exit $?)"
