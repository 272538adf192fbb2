"""MoE block benchmark: selfkd's SparseMoE vs transformers' Qwen3OmniMoeThinkerTextSparseMoeBlock, fwd + bwd.

    .venv/bin/python bench/bench_moe.py [--dtype float32|bfloat16] [--tokens 2048] [--reps 5]

Real Qwen3-Omni width by default: hidden 2048, 128 experts, top-8, moe_intermediate 768, input
[1, tokens, 2048], norm_topk_prob true, on CPU with torch.set_num_threads(--threads, default 2).

Both blocks share the SAME parameter objects (the HF block is built on the meta device and its
router / expert parameters are then replaced by ours), so they see identical weights and the
benchmark holds one copy of them. The HF experts implementation is chosen per call through
`config._experts_implementation` ("eager" = the class's own per-expert loop with index_add_,
"grouped_mm" = transformers.integrations.moe.grouped_mm_experts_forward, which calls
torch.nn.functional.grouped_mm; `PreTrainedModel` picks "grouped_mm" by default, also on CPU,
while a bare block with no implementation set falls back to eager). The implementation that
actually ran is recorded at forward time (ExpertsInterface.get_interface) and, in the check
pass, by counting torch.nn.functional.grouped_mm calls.

Two backward modes, each timed as forward + backward of a fixed random cotangent:
  full    input, router and expert weights require grad (full fine-tuning)
  frozen  only the input requires grad (LoRA training: the base weights are frozen)

Repetitions are interleaved (selfkd, HF eager, HF grouped_mm, selfkd, ...; the order rotates each
rep) after --warmup untimed runs; medians are reported, ratio = HF time / selfkd time (> 1 means
selfkd is faster). --profile prints torch.profiler top ops of one selfkd full step.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_qwen3omni import SparseMoE, ThinkerConfig  # noqa: E402

IMPLS = ("eager", "grouped_mm")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--inter", type=int, default=768, help="moe_intermediate_size")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="full,frozen", help="comma list of: full, frozen")
    p.add_argument("--impls", default=",".join(IMPLS), help="HF experts implementations to time")
    p.add_argument("--router-std", type=float, default=None,
                   help="router weight std (default 1/sqrt(hidden): router logits ~ N(0, 1))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="profile one selfkd step per mode (top ops)")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# Models


def build(args, dtype):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextSparseMoeBlock

    H, E, K, I = args.hidden, args.experts, args.topk, args.inter
    cfg = ThinkerConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I,
                        norm_topk_prob=True)
    ours = SparseMoE(cfg)
    g = torch.Generator().manual_seed(args.seed)
    router_std = args.router_std if args.router_std is not None else H ** -0.5
    with torch.no_grad():
        ours.gate.weight.copy_(router_std * torch.randn(ours.gate.weight.shape, generator=g))
        for p in (ours.experts.gate_up_proj, ours.experts.down_proj):
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    ours.to(dtype)

    hf_cfg = Qwen3OmniMoeTextConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I,
                                    norm_topk_prob=True, hidden_act="silu")
    with torch.device("meta"):
        hf = Qwen3OmniMoeThinkerTextSparseMoeBlock(hf_cfg)
    # same parameter objects: identical weights, one copy in memory
    assert hf.gate.weight.shape == ours.gate.weight.shape
    assert hf.experts.gate_up_proj.shape == ours.experts.gate_up_proj.shape
    assert hf.experts.down_proj.shape == ours.experts.down_proj.shape
    hf.gate.weight = ours.gate.weight
    hf.experts.gate_up_proj = ours.experts.gate_up_proj
    hf.experts.down_proj = ours.experts.down_proj
    assert not any(p.is_meta for p in hf.parameters())
    return ours, hf, hf_cfg, router_std


class ImplRecorder:
    """Records which experts function the HF wrapper dispatched to, at forward time."""

    def __init__(self):
        from transformers.integrations import moe

        self.iface = moe.ALL_EXPERTS_FUNCTIONS
        self.orig = self.iface.get_interface
        self.calls = []

        def get_interface(name, default):
            fn = self.orig(name, default)
            self.calls.append((name, "eager" if fn is default else fn.__name__))
            return fn

        self.iface.get_interface = get_interface  # instance attribute shadows the method

    def last(self):
        return self.calls[-1] if self.calls else None


def hf_forward(hf, hf_cfg, impl):
    def fn(x):
        hf_cfg._experts_implementation = impl
        return hf(x)

    return fn


# ----------------------------------------------------------------------------------------------
# Check


def routing_counts(ours, x):
    with torch.no_grad():
        probs = torch.softmax(ours.gate(x.reshape(-1, x.shape[-1])), dim=-1, dtype=torch.float)
        ids = torch.topk(probs, ours.top_k, dim=-1).indices
        return torch.bincount(ids.reshape(-1), minlength=ours.experts.num_experts)


def check(ours, hf, hf_cfg, impls, x, cot, rec):
    """Outputs, input grads and weight grads of every HF impl vs selfkd (all params require grad)."""
    params = list(ours.parameters())
    for p in params:
        p.requires_grad_(True)

    def run(fn):
        for p in params:
            p.grad = None
        xi = x.detach().clone().requires_grad_(True)
        out = fn(xi)
        torch.autograd.backward(out, cot)
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out.detach(), xi.grad, grads

    ref_out, ref_gx, ref_gw = run(ours)
    names = [n for n, _ in ours.named_parameters()]
    print(f"output max |selfkd| = {ref_out.abs().max().item():.4g}, input grad max |selfkd| = "
          f"{ref_gx.abs().max().item():.4g}")
    ok = True
    for impl in impls:
        n_gmm = [0]
        orig = torch.nn.functional.grouped_mm

        def counting(*a, **k):
            n_gmm[0] += 1
            return orig(*a, **k)

        torch.nn.functional.grouped_mm = counting
        try:
            out, gx, gw = run(hf_forward(hf, hf_cfg, impl))
        finally:
            torch.nn.functional.grouped_mm = orig
        ran = rec.last()
        d_out = (out.float() - ref_out.float()).abs().max().item()
        d_gx = (gx.float() - ref_gx.float()).abs().max().item()
        d_gw = {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip(names, gw, ref_gw)}
        print(f"HF {impl:10s} ran {ran[1]} (config._experts_implementation={ran[0]!r}, "
              f"F.grouped_mm calls fwd+bwd: {n_gmm[0]}): max|out diff| {d_out:.3g}  max|dx diff| {d_gx:.3g}  "
              + "  ".join(f"max|d{n.split('.')[-2] if n.endswith('weight') else n.split('.')[-1]} diff| {v:.3g}"
                          for n, v in d_gw.items()))
        expected = "eager" if impl == "eager" else "grouped_mm_experts_forward"
        if ran[1] != expected or (impl == "grouped_mm") != (n_gmm[0] > 0):
            print(f"  !! HF {impl}: expected {expected} to run")
            ok = False
        tol = 1e-4 if x.dtype == torch.float32 else 0.1
        if d_out > tol * max(1.0, ref_out.abs().max().item()) or d_gx > tol * max(1.0, ref_gx.abs().max().item()):
            print(f"  !! HF {impl}: outputs/grads disagree beyond {tol}")
            ok = False
    return ok


# ----------------------------------------------------------------------------------------------
# Timing


def step(fn, x, cot, params):
    for p in params:
        p.grad = None
    xi = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    out = fn(xi)
    t1 = time.perf_counter()
    torch.autograd.backward(out, cot)
    t2 = time.perf_counter()
    del out, xi
    for p in params:
        p.grad = None
    return t1 - t0, t2 - t0


def bench_mode(mode, variants, ours, x, cot, reps, warmup, rec):
    params = list(ours.parameters())
    for p in params:
        p.requires_grad_(mode == "full")
    names = list(variants)
    fwd = {n: [] for n in names}
    tot = {n: [] for n in names}
    for r in range(warmup + reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for n in order:
            f, t = step(variants[n][0], x, cot, params)
            impl = variants[n][1]
            if impl is not None:
                assert rec.last()[1] == ("eager" if impl == "eager" else "grouped_mm_experts_forward"), rec.last()
            tag = "warmup" if r < warmup else f"rep {r - warmup + 1}"
            print(f"  [{mode}] {tag:7s} {n:16s} fwd {f:7.3f} s  fwd+bwd {t:7.3f} s", flush=True)
            if r >= warmup:
                fwd[n].append(f)
                tot[n].append(t)
    return {n: (statistics.median(fwd[n]), statistics.median(tot[n])) for n in names}


def profile_step(fn, x, cot, params, mode, row_limit=15):
    from torch.profiler import ProfilerActivity, profile

    for p in params:
        p.requires_grad_(mode == "full")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, x, cot, params)
    print(f"\n--- torch.profiler, selfkd, mode={mode}: top ops by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    impls = [i for i in args.impls.split(",") if i]
    modes = [m for m in args.modes.split(",") if m]
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"dtype {args.dtype}")
    print(f"shape: x [1, {args.tokens}, {args.hidden}], {args.experts} experts, top-{args.topk}, "
          f"moe_intermediate {args.inter}, norm_topk_prob true")

    ours, hf, hf_cfg, router_std = build(args, dtype)
    rec = ImplRecorder()
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, args.tokens, args.hidden, generator=g).to(dtype)
    cot = torch.randn(1, args.tokens, args.hidden, generator=g).to(dtype)
    counts = routing_counts(ours, x)
    mean = args.tokens * args.topk / args.experts
    print(f"routing (router std {router_std:.4g}): tokens per expert min {counts.min().item()} / "
          f"median {counts.median().item()} / max {counts.max().item()} (mean "
          f"{mean:.1f}), experts with no token: {(counts == 0).sum().item()}")
    if counts.max().item() > 4 * mean or (counts == 0).sum().item() > args.experts // 2:
        print("!! routing is degenerate; raise --router-std")

    t = time.perf_counter()
    ok = check(ours, hf, hf_cfg, impls, x, cot, rec)
    print(f"check {'passed' if ok else 'FAILED'} ({time.perf_counter() - t:.1f} s)")
    if not ok:
        sys.exit(1)

    variants = {"selfkd": (ours, None)}
    variants.update({f"HF {impl}": (hf_forward(hf, hf_cfg, impl), impl) for impl in impls})
    results = {}
    for mode in modes:
        results[mode] = bench_mode(mode, variants, ours, x, cot, args.reps, args.warmup, rec)

    if args.profile:
        for mode in modes:
            profile_step(ours, x, cot, list(ours.parameters()), mode)

    print("\n## MoE block fwd+bwd, median seconds"
          f" ({args.reps} interleaved reps after {args.warmup} warmup; ratio = HF / selfkd, > 1: selfkd faster)\n")
    print("| mode | variant | fwd s | fwd+bwd s | ratio fwd+bwd |")
    print("|---|---|---:|---:|---:|")
    for mode in modes:
        base = results[mode]["selfkd"][1]
        for n, (f, tt) in results[mode].items():
            print(f"| {mode} | {n} | {f:.3f} | {tt:.3f} | {'' if n == 'selfkd' else f'{tt / base:.2f}'} |")
    print("\ncommand: " + " ".join([os.path.relpath(sys.executable)] + sys.argv))


if __name__ == "__main__":
    main()
