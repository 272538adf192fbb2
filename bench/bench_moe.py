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

Two backward modes, each timed as forward + backward of a fixed random cotangent (not
out.sum(): its stride-0 gradient makes torch 2.13's CPU F.grouped_mm backward raise):
  full    input, router and expert weights require grad (full fine-tuning)
  frozen  only the input requires grad (LoRA training: the base weights are frozen)

Check first (weights frozen, cheap): every variant's output and input grad vs selfkd. The weight
grads of the variants named in --weight-grads (default: the fast ones) are compared to the first.

Repetitions are interleaved (selfkd, HF eager, HF grouped_mm, ...; the order rotates each rep)
after --warmup untimed runs; medians are reported; ratio = variant time / selfkd time (for HF
rows > 1 means selfkd is faster). A variant whose step exceeds --max-step-s is not repeated.

HF eager's full step takes minutes at this width: each `gate_up_proj[expert_idx]` select has a
SelectBackward that materialises a zero-filled gradient of the WHOLE stacked tensor per expert
(128 x 1.6 GB + 128 x 0.8 GB in fp32), which autograd then sums (selfkd had the same cost until
Experts.per_expert() unbound the stacks once per forward). So full mode times HF eager only if
--full-impls says so (~3.5 min per step; it is run once, see --max-step-s).
--grouped adds "selfkd grouped": selfkd's SparseMoE on its grouped path (Experts.grouped = True:
torch.nn.functional.grouped_mm, what it picks on CUDA in bf16), the plain "selfkd" row being the
per-expert loop it runs on CPU. --profile prints torch.profiler top ops of one selfkd step per mode.

--kernels is a separate mode, without transformers: selfkd's block with LoRA on the experts (r8,
experts frozen, LoRA trainable, as in training), loop vs grouped path, LoRA on and off. For each it
counts the aten ops one forward + backward dispatches (a TorchDispatchMode below autograd: the
ops that run, backward included; "kernels" leaves out views and other metadata-only ops, which
launch nothing), checks the grouped path against the loop (output, input gradient, LoRA
gradients) and times both, interleaved. --device cuda runs it on a GPU (bench/gpu.sh), where it
also counts the CUDA kernels torch.profiler sees.

    .venv/bin/python bench/bench_moe.py --kernels [--tokens 256] [--device cpu|cuda] [--dtype bfloat16]

A default run takes ~3 min on 2 idle cores (fp32; --grouped adds ~1 min). Other jobs on the
machine slow selfkd's per-expert loop far more than grouped_mm (each of its ~1500 small ops per
step waits for both OpenMP threads to be scheduled), so read the min column next to the median.
"""

import argparse
import collections
import os
import shlex
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_qwen3omni import SparseMoE, ThinkerConfig  # noqa: E402

IMPLS = ("eager", "grouped_mm")
PROPOSED = "selfkd grouped"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--tokens", type=int, default=None, help="default 2048 (256 with --kernels)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--inter", type=int, default=768, help="moe_intermediate_size")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="full,frozen", help="comma list of: full, frozen")
    p.add_argument("--impls", default=",".join(IMPLS), help="HF experts implementations timed in frozen mode")
    p.add_argument("--full-impls", default="grouped_mm",
                   help="HF experts implementations timed in full mode (eager: ~3 min per step at real width)")
    p.add_argument("--max-step-s", type=float, default=90.0,
                   help="a variant whose fwd+bwd takes longer is not repeated (its first step is the sample)")
    p.add_argument("--grouped", dest="proposed", action="store_true",
                   help="also time selfkd's SparseMoE on its grouped path (Experts.grouped = True)")
    p.add_argument("--kernels", action="store_true",
                   help="op counts, check and timing of selfkd's loop vs grouped path with LoRA (no transformers)")
    p.add_argument("--device", default="cpu", help="--kernels only: cpu or cuda")
    p.add_argument("--lora-rank", type=int, default=8, help="--kernels: LoRA rank on the experts")
    p.add_argument("--weight-grads", default=f"selfkd,HF grouped_mm,{PROPOSED}",
                   help="comma list of variants whose weight grads the check compares ('HF eager': ~3.5 min)")
    p.add_argument("--router-std", type=float, default=None,
                   help="router weight std (default 1/sqrt(hidden): router logits ~ N(0, 1))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="profile one selfkd step per mode (top ops)")
    args = p.parse_args()
    if args.tokens is None:
        args.tokens = 256 if args.kernels else 2048
    args.weight_grads = [n.strip() for n in args.weight_grads.split(",") if n.strip()]
    return args


# ----------------------------------------------------------------------------------------------
# Models


def router_std(args) -> float:
    """--router-std, else hidden^-0.5: router logits ~ N(0, 1)."""
    return args.router_std if args.router_std is not None else args.hidden ** -0.5


def random_block(args):
    """(selfkd's SparseMoE at args' width with seeded random weights: router ~ N(0, router_std),
    experts ~ N(0, 0.02); the generator, to draw more from)."""
    cfg = ThinkerConfig(hidden_size=args.hidden, num_experts=args.experts, num_experts_per_tok=args.topk,
                        moe_intermediate_size=args.inter, norm_topk_prob=True)
    block = SparseMoE(cfg)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        block.gate.weight.copy_(router_std(args) * torch.randn(block.gate.weight.shape, generator=g))
        for p in (block.experts.gate_up_proj, block.experts.down_proj):
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return block, g


def build(args, dtype):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextSparseMoeBlock

    H, E, K, I = args.hidden, args.experts, args.topk, args.inter
    ours, _ = random_block(args)
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

    prop = None  # ours keeps Experts.grouped = None: the path selfkd picks on the device (CPU: the loop)
    if args.proposed:
        with torch.device("meta"):
            prop = SparseMoE(ThinkerConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K,
                                           moe_intermediate_size=I, norm_topk_prob=True))
        prop.experts.grouped = True
        prop.gate.weight = ours.gate.weight
        prop.experts.gate_up_proj = ours.experts.gate_up_proj
        prop.experts.down_proj = ours.experts.down_proj
        assert not any(p.is_meta for p in prop.parameters())
    return ours, hf, hf_cfg, prop, router_std(args)


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


def check(variants, named, x, cot, rec, weight_grads):
    """Outputs and input grads of every variant vs selfkd (weights frozen, so this is cheap); weight
    grads of the variants in `weight_grads` (a full step each) vs the first of them."""
    params = [p for _, p in named]
    tol = 1e-4 if x.dtype == torch.float32 else 5e-2
    ref = None
    ok = True
    gw_ref = None
    for name, (fn, impl) in variants.items():
        want_gw = name in weight_grads
        for p in params:
            p.requires_grad_(want_gw)
            p.grad = None
        n_gmm = [0]
        orig = torch.nn.functional.grouped_mm

        def counting(*a, **k):
            n_gmm[0] += 1
            return orig(*a, **k)

        torch.nn.functional.grouped_mm = counting
        t = time.perf_counter()
        try:
            xi = x.detach().clone().requires_grad_(True)
            out = fn(xi)
            ran = rec.last() if impl is not None else None
            torch.autograd.backward(out, cot)
        finally:
            torch.nn.functional.grouped_mm = orig
        secs = time.perf_counter() - t
        out, gx = out.detach(), xi.grad
        gw = [p.grad for p in params] if want_gw else None
        for p in params:
            p.grad = None
        line = f"{name:30s}"
        if impl is not None:
            expected = "eager" if impl == "eager" else "grouped_mm_experts_forward"
            line += (f" ran {ran[1]} (config._experts_implementation={ran[0]!r}, "
                     f"F.grouped_mm calls fwd+bwd: {n_gmm[0]})")
            if ran[1] != expected or (impl == "grouped_mm") != (n_gmm[0] > 0):
                print(f"  !! {name}: expected {expected} to run")
                ok = False
        if ref is None:
            ref = (out, gx)
            line += (f": output max |.| {out.abs().max().item():.4g}, input grad max |.| "
                     f"{gx.abs().max().item():.4g}")
        else:
            d_out = (out.float() - ref[0].float()).abs().max().item()
            d_gx = (gx.float() - ref[1].float()).abs().max().item()
            line += f": max|out - selfkd| {d_out:.3g}, max|dx - selfkd| {d_gx:.3g}"
            if d_out > tol * max(1.0, ref[0].abs().max().item()) or d_gx > tol * max(1.0, ref[1].abs().max().item()):
                print(f"  !! {name}: output / input grad disagree with selfkd beyond {tol}")
                ok = False
        if gw is not None:
            if gw_ref is None:
                gw_ref = (name, gw)
                line += "; weight grads: reference for the others"
            else:
                diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(gw, gw_ref[1])]
                scale = max(b.abs().max().item() for b in gw_ref[1])
                line += "; weight grads max|d - " + gw_ref[0] + "| " + ", ".join(
                    f"{n.split('.')[-1] if not n.endswith('.weight') else n.split('.')[-2]} {d:.3g}"
                    for (n, _), d in zip(named, diffs))
                if max(diffs) > tol * max(1.0, scale):
                    print(f"  !! {name}: weight grads disagree with {gw_ref[0]} beyond {tol}")
                    ok = False
        print(line + f"  [{secs:.1f} s]", flush=True)
        del out, gx, gw
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


def bench_mode(mode, variants, params, x, cot, reps, warmup, max_step_s, rec):
    """Interleaved reps; a variant whose step takes longer than max_step_s is not run again in this
    mode (if that was its warmup step, that step is its one sample)."""
    for p in params:
        p.requires_grad_(mode == "full")
    names = list(variants)
    samples = {n: [] for n in names}
    stopped = set()
    for r in range(warmup + reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for n in order:
            if n in stopped:
                continue
            fn, impl = variants[n]
            f, t = step(fn, x, cot, params)
            if impl is not None:
                assert rec.last()[1] == ("eager" if impl == "eager" else "grouped_mm_experts_forward"), rec.last()
            tag = "warmup" if r < warmup else f"rep {r - warmup + 1}"
            note = ""
            if r >= warmup or t > max_step_s:
                samples[n].append((f, t))
            if t > max_step_s:
                stopped.add(n)
                note = f"  (> --max-step-s {max_step_s:g}: not repeated" + (", warmup kept as the sample)" if r < warmup else ")")
            print(f"  [{mode}] {tag:7s} {n:30s} fwd {f:8.3f} s  fwd+bwd {t:8.3f} s{note}", flush=True)
    return {n: (len(v), statistics.median(a for a, _ in v), statistics.median(b for _, b in v), min(b for _, b in v))
            for n, v in samples.items()}


def profile_step(fn, x, cot, params, mode, row_limit=12):
    from torch.profiler import ProfilerActivity, profile

    for p in params:
        p.requires_grad_(mode == "full")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        f, t = step(fn, x, cot, params)
    print(f"\n--- torch.profiler, selfkd, mode={mode} (fwd {f:.2f} s, fwd+bwd {t:.2f} s under the profiler): "
          "top ops by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))


# ----------------------------------------------------------------------------------------------
# --kernels: selfkd's per-expert loop vs its grouped path, with LoRA on the experts

# ops that only make or reinterpret tensor metadata (or allocate without writing): no kernel runs
METADATA_OPS = {"detach", "empty", "empty_like", "empty_strided", "alias", "lift_fresh", "new_empty",
                "new_empty_strided"}


def is_metadata(func) -> bool:
    return func.is_view or func._opname in METADATA_OPS


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run, forward and backward: a dispatch mode sits below autograd, so it
    sees each op the engine executes (composite ops already decomposed), i.e. what a device runs."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.ops.values())

    def kernels(self) -> int:
        return sum(n for f, n in self.ops.items() if not is_metadata(f))

    def count(self, name) -> int:
        return sum(n for f, n in self.ops.items() if f._opname == name)


def lora_block(args, dtype, device):
    """selfkd's SparseMoE at the given width, random weights (router logits ~ N(0, 1)), experts frozen,
    LoRA on the experts (B random, so the delta is not 0) trainable."""
    from lora import LoRAExperts

    block, g = random_block(args)
    block.requires_grad_(False)
    block.experts = LoRAExperts(block.experts, args.lora_rank, 2 * args.lora_rank, 0.0, generator=g)
    with torch.no_grad():
        for B in (branch.B for branch in block.experts.lora.values()):
            B.copy_(0.01 * torch.randn(B.shape, generator=g))
    return block.to(device=device, dtype=dtype)


def kernels(args):
    from contextlib import nullcontext

    from lora import lora_disabled

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, "
          f"threads {torch.get_num_threads()}, dtype {args.dtype}")
    print(f"selfkd SparseMoE: x [1, {args.tokens}, {args.hidden}], {args.experts} experts top-{args.topk}, "
          f"intermediate {args.inter}, LoRA r{args.lora_rank} on the experts (experts frozen, LoRA trainable)")
    block = lora_block(args, dtype, device)
    lora = [p for n, p in block.named_parameters() if ".lora." in n]
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
    cot = torch.randn(1, args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        ids = torch.topk(block.gate(x.view(-1, args.hidden)), args.topk).indices.reshape(-1)
    used = int(torch.unique(ids).numel())
    print(f"routing: {used} of {args.experts} experts get tokens")

    def run(path, lora_on):
        block.experts.grouped = path == "grouped"
        for p in lora:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        with nullcontext() if lora_on else lora_disabled(block):
            out = block(xi)
            out.backward(cot)
        return out.detach(), xi.grad, [p.grad for p in lora] if lora_on else []

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()

    variants = [(path, on) for on in (True, False) for path in ("loop", "grouped")]
    name = lambda v: f"{v[0]}, LoRA {'on' if v[1] else 'off'}"  # noqa: E731
    rows = {v: {} for v in variants}
    ok = True
    for on in (True, False):  # check: grouped vs the loop (also the warm-up)
        out, dx, grads = run("loop", on)
        g_out, g_dx, g_grads = run("grouped", on)
        worst_grad = max([rel(a, b) for a, b in zip(g_grads, grads)] or [0.0])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        print(f"check grouped vs loop, LoRA {'on' if on else 'off'}: rel diff output {rel(g_out, out):.2e}, "
              f"input grad {rel(g_dx, dx):.2e}, LoRA grads (max) {worst_grad:.2e}")
        ok &= max(rel(g_out, out), rel(g_dx, dx), worst_grad) <= tol
    for v in variants:  # op counts
        counter = OpCounter()
        with counter:
            run(*v)
        rows[v].update(ops=counter.total(), kernels=counter.kernels(), grouped_mm=counter.count("_grouped_mm"),
                       mm=counter.count("mm"))
        if v == ("grouped", True):
            top = ", ".join(f"{f._opname} {n}" for f, n in counter.ops.most_common(12))
            print(f"grouped, LoRA on, ops by name: {top}")
        if cuda:  # the kernels the GPU actually launched
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run(*v)
                sync()
            rows[v]["cuda_kernels"] = sum(1 for e in prof.events()
                                          if e.device_type == torch.autograd.DeviceType.CUDA)
    times, cpu_times = {v: [] for v in variants}, {v: [] for v in variants}
    for r in range(args.reps):  # interleaved, order rotating
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            sync()
            t, c = time.perf_counter(), time.process_time()
            run(*v)
            sync()
            times[v].append(time.perf_counter() - t)
            cpu_times[v].append(time.process_time() - c)
    print(f"\n## selfkd MoE block, fwd+bwd, {args.device}, {args.dtype}, {args.tokens} tokens, {args.experts} experts "
          f"top-{args.topk} ({used} used), hidden {args.hidden}, intermediate {args.inter}, LoRA r{args.lora_rank}\n")
    print("| path | aten ops | of which kernels | grouped_mm | mm |" + (" CUDA kernels (profiler) |" if cuda else "")
          + " median s | min s |" + ("" if cuda else " CPU s |"))
    print("|---|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|" + ("" if cuda else "---:|"))
    for v in variants:
        r = rows[v]
        print(f"| {name(v)} | {r['ops']:,} | {r['kernels']:,} | {r['grouped_mm']} | {r['mm']} |"
              + (f" {r['cuda_kernels']:,} |" if cuda else "")
              + f" {statistics.median(times[v]):.4f} | {min(times[v]):.4f} |"
              + ("" if cuda else f" {statistics.median(cpu_times[v]):.4f} |"))
    print(f"\n{args.reps} interleaved reps after the check pass: wall-clock median and min, and (CPU) the median "
          "process CPU time over all threads, which other jobs on a shared machine disturb less; load average "
          "%.2f %.2f %.2f" % os.getloadavg())
    print("command: " + shlex.join([os.path.relpath(sys.executable)] + sys.argv))
    print(f"check {'passed' if ok else 'FAILED'}")
    if not ok:
        sys.exit(1)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.kernels:
        return kernels(args)
    dtype = getattr(torch, args.dtype)
    modes = [m for m in args.modes.split(",") if m]
    impls = {"frozen": [i for i in args.impls.split(",") if i], "full": [i for i in args.full_impls.split(",") if i]}
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"dtype {args.dtype}")
    print(f"shape: x [1, {args.tokens}, {args.hidden}], {args.experts} experts, top-{args.topk}, "
          f"moe_intermediate {args.inter}, norm_topk_prob true")
    print("load average at start: %.2f %.2f %.2f (this machine has %d cores)" % (os.getloadavg() + (os.cpu_count(),)))

    ours, hf, hf_cfg, prop, router_std = build(args, dtype)
    named = list(ours.named_parameters())
    params = [p for _, p in named]
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

    all_impls = list(dict.fromkeys(impls["frozen"] + impls["full"]))
    variants = {"selfkd": (ours, None)}
    variants.update({f"HF {impl}": (hf_forward(hf, hf_cfg, impl), impl) for impl in all_impls})
    if prop is not None:
        variants[PROPOSED] = (prop, None)

    print("\ncheck: outputs and input grads vs selfkd (weights frozen)"
          + (f"; weight grads of {', '.join(n for n in variants if n in args.weight_grads)}" if args.weight_grads else ""))
    t = time.perf_counter()
    ok = check(variants, named, x, cot, rec, args.weight_grads)
    print(f"check {'passed' if ok else 'FAILED'} ({time.perf_counter() - t:.1f} s)\n")
    if not ok:
        sys.exit(1)

    results = {}
    for mode in modes:
        vs = {n: v for n, v in variants.items() if v[1] is None or v[1] in impls[mode]}
        results[mode] = bench_mode(mode, vs, params, x, cot, args.reps, args.warmup, args.max_step_s, rec)

    if args.profile:
        for mode in modes:
            profile_step(ours, x, cot, params, mode)

    print(f"\n## MoE block fwd+bwd on CPU ({torch.get_num_threads()} threads, {args.dtype}, x [1, {args.tokens}, "
          f"{args.hidden}], E={args.experts}, top-{args.topk}, I={args.inter}): median seconds of n interleaved reps "
          f"after {args.warmup} warmup\n")
    print("ratio = variant fwd+bwd / selfkd fwd+bwd, of the medians and of the minima (for HF rows > 1 means selfkd "
          "is faster; the minimum is the least disturbed by other jobs)"
          + (f"; last column: HF / {PROPOSED}" if prop is not None else "") + "\n")
    print("| mode | variant | n | fwd s | fwd+bwd s | min fwd+bwd s | ratio vs selfkd (median) | ratio (min) |"
          + (" ratio HF / selfkd grouped |" if prop is not None else ""))
    print("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if prop is not None else ""))
    for mode in modes:
        base, bmin = results[mode]["selfkd"][2:]
        pbase = results[mode][PROPOSED][2] if prop is not None else None
        for n, (k, f, tt, tmin) in results[mode].items():
            row = (f"| {mode} | {n} | {k} | {f:.3f} | {tt:.3f} | {tmin:.3f} | "
                   f"{'' if n == 'selfkd' else f'{tt / base:.2f}'} | {'' if n == 'selfkd' else f'{tmin / bmin:.2f}'} |")
            if prop is not None:
                row += f" {f'{tt / pbase:.2f}' if n.startswith('HF') else ''} |"
            print(row)
    print("\nload average at end: %.2f %.2f %.2f (%d cores; other jobs inflate absolute times, interleaving keeps "
          "the ratios fairer)" % (os.getloadavg() + (os.cpu_count(),)))
    print("\nmodes: full = input, router and expert weights require grad; frozen = only the input does (LoRA case)")
    print("command: " + shlex.join([os.path.relpath(sys.executable)] + sys.argv))


if __name__ == "__main__":
    main()
