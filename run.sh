#!/usr/bin/env bash
# selfkd launcher.
#
#   bash run.sh
#       The embedded default, end to end: a tiny random Qwen3-Omni checkpoint in the released
#       layout (written once to .cache/), the bundled sample dataset with teacher context,
#       2 processes with ZeRO-3 on CPU (gloo) when there is no GPU, every local GPU otherwise.
#   MODEL=/path/to/Qwen3-Omni-30B-A3B-Instruct [DATASET='data.jsonl#2000'] bash run.sh
#       The seed's configuration (the ms-swift flags of its gkd.sh) on every local GPU.
#   bash run.sh --max_steps 10 ...            extra arguments pass through to selfkd.py
#   HOSTFILE=/path/hostfile MODEL=... bash run.sh   multi-node through DeepSpeed's launcher
#   NPROC=4 bash run.sh                       override the number of processes on this node
set -euo pipefail
cd "$(dirname "$0")"

# Python with the runtime dependencies: the project's venv, created on first use.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, deepspeed, tokenizers, safetensors" 2>/dev/null; then
    echo "run.sh: installing the runtime dependencies into .venv (once)"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -r requirements.txt
fi
PY=.venv/bin/python

export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -eq 0 ]; then
    export DS_ACCELERATOR=cpu
    NPROC=${NPROC:-2}
else
    NPROC=${NPROC:-$NGPU}
fi

if [ -z "${MODEL:-}" ]; then
    # tiny model: float32 on CPU, a learning rate that moves a random model in 40 steps
    ARGS=(--dataset "${DATASET:-data/sample_alpaca.jsonl}" --split_dataset_ratio 0.05
          --torch_dtype "$([ "$NGPU" -eq 0 ] && echo float32 || echo bfloat16)"
          --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 --lora_target_modules ALL
          --max_length 256 --max_completion_length 24 --lmbda 0.5 --temperature 2.0 --beta 0.5
          --teacher_sees_reference true --per_device_train_batch_size 4 --per_device_eval_batch_size 8
          --learning_rate 3e-3 --warmup_ratio 0.05 --max_steps 40 --deepspeed zero3
          --output_dir output/default --eval_steps 20 --save_steps 20 --save_total_limit 2 --logging_steps 5)
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
    exec .venv/bin/deepspeed --hostfile "$HOSTFILE" selfkd.py "${ARGS[@]}" "$@"
fi
exec $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" selfkd.py "${ARGS[@]}" "$@"
