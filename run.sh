#!/usr/bin/env bash
# selfkd launcher.
#
#   bash run.sh
#       The embedded default, end to end: a tiny random Qwen3-Omni checkpoint in the released
#       layout (written once to .cache/), the bundled sample dataset with teacher context,
#       2 processes with ZeRO-3 on CPU (gloo) when there is no GPU, every local GPU otherwise.
#   DEMO=omni bash run.sh
#       Cross-modal distillation on the embedded default: the student gets the images, audio and
#       video of data/sample_omni.jsonl, the teacher reads their captions and transcripts instead.
#   MODEL=/path/to/Qwen3-Omni-30B-A3B-Instruct [DATASET='data.jsonl#2000'] bash run.sh
#       The released model with the ms-swift GKD configuration (gkd.sh's flags) on every local GPU.
#   bash run.sh --max_steps 10 ...            extra arguments pass through to selfkd.py (a user's own
#                                             --max_steps / --num_train_epochs replaces the default's 40 steps)
#   bash run.sh --help                        every flag and command
#   bash run.sh check [flags]                 validate flags, model and data for this launch; start nothing
#   bash run.sh check --estimate_memory [flags]   what each GPU of this launch will hold, by phase (config.json only)
#   bash run.sh check --simulate_gpu h100|h200 [flags]   the step executed on simulated GPUs: memory, launches, time
#   bash run.sh evaluate|generate|export|curve ...   after training, in one process (see --help)
#   HOSTFILE=/path/hostfile MODEL=... bash run.sh   multi-node through DeepSpeed's launcher (lines `node1 slots=8`)
#   NPROC=4 bash run.sh                       override the number of processes on this node
#
# Bad flags, a bad model directory or bad data stop before any rank starts: one line
# `selfkd: error: ...`, exit code 2. Ctrl-C: exit 130 naming the last checkpoint; SIGTERM: a
# checkpoint at the next step boundary, exit 143. Both continue with --resume_from_checkpoint latest.
set -euo pipefail
cd "$(dirname "$0")"
export SELFKD_RUN_SH=1  # selfkd's closing lines then suggest `bash run.sh ...` commands

# Python with the runtime dependencies: the project's venv, created on first use. The check only
# looks the packages up (importing deepspeed alone takes seconds).
RUNTIME="torch deepspeed tokenizers safetensors numpy matplotlib"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None for m in '$RUNTIME'.split()))" 2>/dev/null; then
    started=$SECONDS
    echo "run.sh: first run: installing the runtime dependencies ($RUNTIME) into .venv."
    echo "run.sh: torch is the big one (about 1 GB, several GB with its CUDA libraries): a few minutes."
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    # pip's own lines, one per package, so the wait is visible
    .venv/bin/pip install --progress-bar off -r requirements.txt \
        | { grep --line-buffered -E '^(Collecting|Successfully installed)' | sed -u 's/^/  pip: /' || true; }
    echo "run.sh: .venv ready ($(du -sh .venv | cut -f1)) in $((SECONDS - started)) s"
fi
PY=.venv/bin/python
# the omni demo reads images, audio and video: the media extras, installed once when missing
if [ "${DEMO:-}" = omni ] && ! $PY -c "
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None for m in ('PIL', 'soundfile', 'soxr', 'av')))" 2>/dev/null; then
    echo "run.sh: the omni demo reads images, audio and video: installing the media extras (requirements-media.txt: Pillow, soundfile, soxr, PyAV) into .venv."
    .venv/bin/pip install --progress-bar off -r requirements-media.txt \
        | { grep --line-buffered -E '^(Collecting|Successfully installed)' | sed -u 's/^/  pip: /' || true; }
fi

# --help and the commands used after training: straight to selfkd.py, one process, no torchrun
for arg in "$@"; do
    case "$arg" in -h|--help) exec $PY selfkd.py "$@" ;; esac
done
case "${1:-}" in
    evaluate|generate|export|curve) exec $PY selfkd.py "$@" ;;
esac
COMMAND=launch
if [ "${1:-}" = check ]; then
    COMMAND=check
    shift
fi

export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -eq 0 ]; then
    export DS_ACCELERATOR=cpu
    NPROC=${NPROC:-2}
else
    NPROC=${NPROC:-$NGPU}
fi

# does the user choose the length of the run?
USER_LENGTH=false
for arg in "$@"; do
    case "$arg" in --max_steps|--max_steps=*|--num_train_epochs|--num_train_epochs=*) USER_LENGTH=true ;; esac
done

if [ -z "${MODEL:-}" ]; then
    # tiny model: float32 on CPU, a learning rate that moves a random model in 40 steps
    ARGS=(--torch_dtype "$([ "$NGPU" -eq 0 ] && echo float32 || echo bfloat16)"
          --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 --lora_target_modules ALL
          --max_completion_length 24 --lmbda 0.5 --temperature 2.0 --beta 0.5 --per_device_train_batch_size 4
          --learning_rate 3e-3 --warmup_ratio 0.05 --deepspeed zero3 --save_steps 20 --save_total_limit 2
          --logging_steps 5 --log_completions 2)
    if [ "${DEMO:-}" = omni ]; then
        # cross-modal: the student hears and sees the media of data/sample_omni.jsonl, the teacher
        # (the same model, LoRA off) reads their transcripts and captions instead
        # (completion 64: the sample's longest answer is 63 tokens, so none is cut)
        ARGS+=(--dataset "${DATASET:-data/sample_omni.jsonl}" --split_dataset_ratio 0.2 --max_length 1024
               --max_completion_length 64
               --teacher_sees_transcript true --per_device_eval_batch_size 4 --output_dir output/omni --eval_steps 10)
    else
        # the teacher sees the reference answer
        ARGS+=(--dataset "${DATASET:-data/sample_alpaca.jsonl}" --split_dataset_ratio 0.05 --max_length 256
               --teacher_sees_reference true --per_device_eval_batch_size 8 --output_dir output/default --eval_steps 20)
    fi
    $USER_LENGTH || ARGS+=(--max_steps 40)
else
    ARGS=(--rlhf_type gkd --model "$MODEL" --teacher_model "$MODEL"
          --train_type lora --torch_dtype bfloat16
          --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 --lora_target_modules ALL
          --dataset "${DATASET:-data/sample_alpaca.jsonl#2000}" --split_dataset_ratio 0.01
          --max_length 2048 --max_completion_length 512 --dataloader_num_workers 4 --dataset_num_proc 4
          --seq_kd false --lmbda 0.5 --temperature 2.0 --beta 0.5
          --num_train_epochs 1 --per_device_train_batch_size 4 --per_device_eval_batch_size 4
          --learning_rate 1e-5 --gradient_accumulation_steps 1 --warmup_ratio 0.05
          --deepspeed zero3 --attn_impl flash_attention_2
          --output_dir output --eval_steps 50 --save_steps 50 --save_total_limit 2
          --logging_steps 5 --save_only_model true)
fi

if [ -n "${HOSTFILE:-}" ]; then
    # every rank of every node: the slots of the hostfile
    WORLD=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) {split($i, a, "="); n += a[2]}} END {print n + 0}' "$HOSTFILE")
    WORLD=$((WORLD > 0 ? WORLD : 1))
    [ "$COMMAND" = check ] && exec $PY selfkd.py check --nproc_per_node "$WORLD" "${ARGS[@]}" "$@"
    $PY selfkd.py check --nproc_per_node "$WORLD" "${ARGS[@]}" "$@" >/dev/null
    exec .venv/bin/deepspeed --hostfile "$HOSTFILE" selfkd.py "${ARGS[@]}" "$@"
fi
# launch = check in this one process (a bad input: one line, exit 2), then torchrun on NPROC ranks
exec $PY selfkd.py "$COMMAND" --nproc_per_node "$NPROC" "${ARGS[@]}" "$@"
