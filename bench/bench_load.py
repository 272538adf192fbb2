"""Loader memory benchmark: peak RSS of load_thinker(path, dtype=torch.bfloat16) on a synthetic checkpoint.

    .venv/bin/python bench/bench_load.py [--path /tmp/selfkd_bench_ckpt] [--keep] [--hf]

1. A subprocess writes a random bf16 checkpoint in the released layout (write_random_checkpoint;
   default config: hidden 1024, 8 layers, 64 experts, moe_intermediate 512, vocab 152064, i.e.
   ~2.4 GB of bf16 tensors, sharded at --shard-mb). A checkpoint already at --path is reused
   (and then never deleted).
2. A FRESH subprocess imports torch + model_qwen3omni and exits: baseline peak RSS.
3. A FRESH subprocess imports the same, then runs load_thinker(path, dtype=torch.bfloat16):
   peak RSS.
Reported: both peaks (resource.getrusage(RUSAGE_SELF).ru_maxrss, and VmHWM from /proc/self/status,
which belongs to the child's own address space only), the tensor bytes (the index's total_size)
and (peak - baseline) / tensor bytes, which should stay <= 1.3.

This process never imports torch, so it stays small: on Linux a child's ru_maxrss starts from the
high-water mark of the address space it exec'ed from, so a big parent would inflate it.

--hf also loads the checkpoint with transformers' Qwen3OmniMoeForConditionalGeneration.from_pretrained
(bf16) in a fresh subprocess, for reference. Its config has no audio/vision sections, so the bench
gives it 1-layer, narrow audio and vision towers (random init, not in the checkpoint) to keep them
negligible. The checkpoint is deleted at the end unless --keep.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default="/tmp/selfkd_bench_ckpt")
    p.add_argument("--keep", action="store_true", help="do not delete the checkpoint afterwards")
    p.add_argument("--hf", action="store_true", help="also measure transformers' from_pretrained")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--inter", type=int, default=512, help="moe_intermediate_size")
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--shard-mb", type=int, default=512, help="max_shard_bytes in MiB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=("write", "baseline", "load", "hf"), help=argparse.SUPPRESS)
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# Children (each runs in a fresh interpreter)


def _vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _peaks():
    import resource

    return {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "vmhwm": _vm("VmHWM"),
            "vmrss": _vm("VmRSS")}


def child(args):
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    import model_qwen3omni as mq
    from weights import load_thinker

    res = {"after_import": _peaks()}
    t = time.perf_counter()
    if args.child == "write":
        from tiny import write_random_checkpoint

        cfg = mq.ThinkerConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_experts=args.experts, moe_intermediate_size=args.inter)
        write_random_checkpoint(cfg, args.path, dtype=torch.bfloat16, max_shard_bytes=args.shard_mb * 2**20)
    elif args.child == "load":
        model = load_thinker(args.path, dtype=torch.bfloat16)
        res["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        res["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    elif args.child == "hf":
        res.update(hf_load(args.path, torch))
    res["seconds"] = time.perf_counter() - t
    res["peak"] = _peaks()
    print("RESULT " + json.dumps(res))


def hf_load(path, torch):
    import transformers
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    transformers.logging.set_verbosity_error()
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["thinker_config"]["audio_config"] = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                                 encoder_ffn_dim=64, output_dim=raw["thinker_config"]
                                                 ["text_config"]["hidden_size"], downsample_hidden_size=16,
                                                 num_mel_bins=128)
    raw["thinker_config"]["vision_config"] = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                                  out_hidden_size=raw["thinker_config"]["text_config"]
                                                  ["hidden_size"], deepstack_visual_indexes=[0])
    cfg = Qwen3OmniMoeConfig(**raw)
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, config=cfg, dtype=torch.bfloat16)
    text = model.thinker.model.language_model.layers[0].mlp.experts.gate_up_proj
    return {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "text_param_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                    if n.startswith(("thinker.model.language_model.", "thinker.lm_head."))),
            "dtypes": sorted({str(p.dtype) for p in model.parameters()}), "experts_shape": list(text.shape)}


# ----------------------------------------------------------------------------------------------
# Parent (no torch)


def run_child(args, kind):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--path", args.path,
           "--threads", str(args.threads), "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--experts", str(args.experts), "--inter", str(args.inter), "--vocab", str(args.vocab),
           "--shard-mb", str(args.shard_mb)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"child {kind!r} failed (exit {p.returncode})")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall"] = wall
    return res


def gib(n):
    return f"{n / 2**30:.3f} GiB"


def main():
    args = parse_args()
    if args.child:
        return child(args)

    index = os.path.join(args.path, "model.safetensors.index.json")
    wrote = False
    if os.path.isfile(index):
        print(f"reusing the checkpoint at {args.path}")
    else:
        print(f"writing a random bf16 checkpoint to {args.path} (hidden {args.hidden}, {args.layers} layers, "
              f"{args.experts} experts, moe_intermediate {args.inter}, vocab {args.vocab}, "
              f"shards <= {args.shard_mb} MiB) ...", flush=True)
        w = run_child(args, "write")
        wrote = True
        print(f"  written in {w['seconds']:.1f} s")
    try:
        with open(index) as f:
            idx = json.load(f)
        total = idx["metadata"]["total_size"]
        shards = sorted(set(idx["weight_map"].values()))
        on_disk = sum(os.path.getsize(os.path.join(args.path, s)) for s in shards)
        print(f"tensor bytes (index total_size): {total:,} = {gib(total)}; {len(idx['weight_map'])} tensors in "
              f"{len(shards)} shards, {gib(on_disk)} on disk")
        if total < 2**30:
            print("!! the checkpoint holds less than 1 GiB of tensors")

        runs = [("baseline", "import torch + model_qwen3omni"), ("load", "load_thinker(path, torch.bfloat16)")]
        if args.hf:
            runs.append(("hf", "HF Qwen3OmniMoeForConditionalGeneration.from_pretrained (bf16)"))
        res = {}
        for kind, what in runs:
            print(f"fresh subprocess: {what} ...", flush=True)
            res[kind] = run_child(args, kind)
            r = res[kind]
            extra = ""
            if "param_bytes" in r:
                extra = f", params {gib(r['param_bytes'])} {r['dtypes']}"
                if "text_param_bytes" in r:
                    extra += f" (text {gib(r['text_param_bytes'])}, experts {r['experts_shape']})"
            print(f"  ru_maxrss {gib(r['peak']['ru_maxrss'])}, VmHWM {gib(r['peak']['vmhwm'])}, "
                  f"after imports {gib(r['after_import']['vmrss'])}, final RSS {gib(r['peak']['vmrss'])}, "
                  f"{r['seconds']:.1f} s{extra}")
        if res["load"]["param_bytes"] != total:
            print(f"!! loaded parameter bytes {res['load']['param_bytes']:,} != total_size {total:,}")

        base = res["baseline"]["peak"]
        print(f"\n## Peak RSS while loading {gib(total)} of bf16 tensors ({len(shards)} shards)\n")
        print("| process | ru_maxrss | VmHWM | (peak - baseline) / tensor bytes | load s |")
        print("|---|---:|---:|---:|---:|")
        print(f"| baseline: import torch + model_qwen3omni | {gib(base['ru_maxrss'])} | {gib(base['vmhwm'])} | | |")
        names = {"load": "selfkd load_thinker", "hf": "HF from_pretrained"}
        for kind in [k for k, _ in runs if k != "baseline"]:
            r = res[kind]
            ratio = (r["peak"]["ru_maxrss"] - base["ru_maxrss"]) / total
            ratio_h = (r["peak"]["vmhwm"] - base["vmhwm"]) / total
            print(f"| {names[kind]} | {gib(r['peak']['ru_maxrss'])} | {gib(r['peak']['vmhwm'])} | "
                  f"{ratio:.3f} (VmHWM: {ratio_h:.3f}) | {r['seconds']:.1f} |")
        ratio = (res["load"]["peak"]["ru_maxrss"] - base["ru_maxrss"]) / total
        print(f"\nselfkd load_thinker: (peak - baseline) / tensor bytes = {ratio:.3f} "
              f"({'within' if ratio <= 1.3 else 'ABOVE'} 1.3)")
        print("\ncommand: " + shlex.join([os.path.relpath(sys.executable)] + sys.argv))
    finally:
        if not args.keep and wrote:
            shutil.rmtree(args.path, ignore_errors=True)
            print(f"deleted {args.path}")
        elif args.keep:
            print(f"kept {args.path}")


if __name__ == "__main__":
    main()
