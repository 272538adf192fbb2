"""ZeRO-2 vs ZeRO-3: the real training step, timed from real `selfkd.py` runs.

    .venv/bin/python bench/bench_zero.py                        # embedded default model, 1 and 2 processes
    .venv/bin/python bench/bench_zero.py --real-width --layers 2 --nproc 2 --steps 3 --lmbda 0
    .venv/bin/python bench/bench_zero.py --deepspeed zero3,my_config.json   # any --deepspeed values

Each (processes, --deepspeed) pair is one `torch.distributed.run selfkd.py` launch with the same
flags, on CPU (gloo, OMP_NUM_THREADS=1 per rank, as run.sh does) or, where there are GPUs, one GPU
per process (nccl; e.g. `--real-width --layers 4 --nproc 1 --deepspeed zero2,stage3` on one GPU); its metrics.jsonl gives every
step's `step_seconds` (what the training loop measures around selfkd.train_step). The first step is
left out (warm-up); the table shows the median of the others, per branch (dataset / on-policy),
and rank 0's peak RSS. Model and data:

  default        the embedded default (tiny.py: hidden 128, 4 layers, 8 experts top-2, vocab 152064),
                 data/sample_alpaca.jsonl with the reference answer in the teacher's prompt, the
                 embedded default's flags (batch 4 per process, max_length 256, completion 24,
                 lmbda 0.5, LoRA r8 on all linear layers, gradient checkpointing on)
  --real-width   the released layer shapes (hidden 2048, 32/4 heads x 128, 128 experts top-8, expert
                 intermediate 768, vocab 152064) with --layers layers, random weights, bf16, written once
                 to /tmp/selfkd_bench; batch 1 per process, completion 16

`--deepspeed zero3` at one process is the preset as selfkd resolves it (ZeRO-2: one rank has
nothing to partition); `--deepspeed stage3` stands for a JSON file with the zero3 preset's fields
and stage 3 kept, to time real ZeRO-3 at one process. `--selfkd A/selfkd.py,B/selfkd.py` times
other checkouts too (e.g. an older commit unpacked with `git archive`), each run in its own
directory; with `--reps N` every configuration runs N times, the order rotating, and the medians
are over the timed steps of all its runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", default="1,2", help="comma list of process counts")
    p.add_argument("--deepspeed", default="zero2,zero3", help="comma list of --deepspeed values (or 'stage3')")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--lmbda", type=float, default=None, help="on-policy probability (default: the flags' own)")
    p.add_argument("--real-width", action="store_true", help="the released layer shapes, bf16")
    p.add_argument("--layers", type=int, default=2, help="decoder layers with --real-width")
    p.add_argument("--selfkd", default=os.path.join(ROOT, "selfkd.py"), help="comma list of selfkd.py files to time")
    p.add_argument("--reps", type=int, default=1, help="runs per configuration (the order rotates)")
    p.add_argument("--extra", default="", help="more selfkd.py flags, one string")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def real_width_model(layers: int) -> str:
    """The released thinker's layer shapes with `layers` layers, random bf16 weights, the tiny tokenizer."""
    import torch

    from model_qwen3omni import ThinkerConfig
    from tiny import write_random_checkpoint, write_tiny_tokenizer

    path = os.path.join("/tmp", "selfkd_bench", f"real-width-l{layers}-bf16")
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return path
    cfg = ThinkerConfig(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                        head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                        intermediate_size=768, rope_theta=1_000_000.0, max_position_embeddings=4096)
    tmp = f"{path}.tmp-{os.getpid()}"
    t = time.time()
    write_tiny_tokenizer(tmp)
    write_random_checkpoint(cfg, tmp, dtype=torch.bfloat16)
    os.replace(tmp, path)
    print(f"wrote {path} ({time.time() - t:.0f} s)", flush=True)
    return path


def flags(a) -> list[str]:
    if a.real_width:
        args = ["--model", real_width_model(a.layers), "--torch_dtype", "bfloat16",
                "--dataset", "data/sample_alpaca.jsonl", "--split_dataset_ratio", "0",
                "--max_length", "256", "--max_completion_length", "16", "--per_device_train_batch_size", "1",
                "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--lora_target_modules", "ALL",
                "--teacher_sees_reference", "true", "--temperature", "2.0", "--lmbda", "0.5",
                "--learning_rate", "1e-4"]
    else:
        from tiny import ensure_default_model

        args = ["--model", ensure_default_model(), "--torch_dtype", "float32",
                "--dataset", "data/sample_alpaca.jsonl", "--split_dataset_ratio", "0",
                "--max_length", "256", "--max_completion_length", "24", "--per_device_train_batch_size", "4",
                "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--lora_target_modules", "ALL",
                "--teacher_sees_reference", "true", "--temperature", "2.0", "--lmbda", "0.5",
                "--learning_rate", "3e-3"]
    if a.lmbda is not None:
        args[args.index("--lmbda") + 1] = str(a.lmbda)
    return args + ["--max_steps", str(a.steps), "--save_steps", str(10**6), "--eval_steps", str(10**6),
                   "--logging_steps", str(10**6), "--save_only_model", "true", "--seed", "1"] + a.extra.split()


def stage3_file(tmp: str) -> str:
    """The zero3 preset's fields with stage 3 kept at any world size, as a --deepspeed JSON file."""
    import torch

    from selfkd import Config, deepspeed_config

    ds = deepspeed_config(Config(deepspeed="zero3"), torch.float32)  # no world_size: stage 3 as it is
    path = os.path.join(tmp, "stage3.json")
    with open(path, "w") as f:
        json.dump({"zero_optimization": ds["zero_optimization"]}, f)
    return path


def run(selfkd: str, nproc: int, deepspeed: str, args: list[str], out: str) -> dict:
    """One `selfkd.py` launch -> its ZeRO stage, step seconds by branch (the first step left out), peak RSS."""
    import torch

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           selfkd, *args, "--deepspeed", deepspeed, "--output_dir", out]
    t = time.time()
    proc = subprocess.run(cmd, cwd=os.path.dirname(selfkd), env=env, capture_output=True, text=True)
    wall = time.time() - t
    if proc.returncode:
        return {"error": (proc.stdout + proc.stderr)[-3000:], "wall_s": wall}
    stage = next((line.split("ZeRO stage ")[1].split(",")[0] for line in proc.stdout.splitlines()
                  if "ZeRO stage " in line), "?")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "step_seconds" in r][1:]  # the first step warms up
    by_branch = {}
    for r in rows:
        by_branch.setdefault(r["branch"], []).append(r["step_seconds"])
    return {"stage": stage, "wall_s": wall, "peak_rss_gib": max(r["peak_memory_gib"] for r in rows),
            "seconds": by_branch}


def main(argv=None):
    a = parse_args(argv)
    args = flags(a)
    codes = [os.path.abspath(p) for p in a.selfkd.split(",")]
    label = {c: os.path.basename(os.path.dirname(c)) if len(codes) > 1 else "" for c in codes}  # checkout names
    configs = [(c, n, ds) for c in codes for n in map(int, a.nproc.split(",")) for ds in a.deepspeed.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_zero-") as tmp:
        for rep in range(a.reps):
            for code, nproc, ds in configs[rep % len(configs):] + configs[:rep % len(configs)]:
                key = f"{label[code]} {nproc} {ds}".strip()
                value = stage3_file(tmp) if ds == "stage3" else ds
                r = run(code, nproc, value, args, os.path.join(tmp, f"out-{configs.index((code, nproc, ds))}-{rep}"))
                if "error" in r:
                    print(f"{key}: FAILED\n{r['error']}", flush=True)
                    continue
                total = results.setdefault(key, {"stage": r["stage"], "peak_rss_gib": 0.0, "seconds": {}})
                total["peak_rss_gib"] = max(total["peak_rss_gib"], r["peak_rss_gib"])
                for b, s in r["seconds"].items():
                    total["seconds"].setdefault(b, []).extend(s)
                print(f"{key} (ZeRO stage {r['stage']}), run {rep + 1}: "
                      + ", ".join(f"{b} {statistics.median(s):.3f} s/step" for b, s in r["seconds"].items())
                      + f"; run {r['wall_s']:.0f} s", flush=True)
    for r in results.values():
        r["median_s"] = {b: statistics.median(s) for b, s in r["seconds"].items()}
    print(f"\n| {'code | ' if len(codes) > 1 else ''}processes | --deepspeed | ZeRO stage | dataset s/step | "
          "on-policy s/step | peak RSS GiB (rank 0) |")
    print("|---" * (6 + (len(codes) > 1)) + "|")
    for key, r in results.items():
        *code, nproc, ds = key.split(" ")
        cell = lambda b: f"{r['median_s'][b]:.3f} ({len(r['seconds'][b])})" if b in r["median_s"] else "-"  # noqa: E731
        print(f"| {code[0] + ' | ' if code else ''}{nproc} | {ds} | {r['stage']} | {cell('dataset')} | "
              f"{cell('on-policy')} | {r['peak_rss_gib']:.2f} |")
    print("(medians of the timed steps; their number in brackets)")
    print(f"\ncommand: {os.path.relpath(sys.executable)} {os.path.relpath(os.path.abspath(__file__))} "
          + " ".join(sys.argv[1:]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
