"""Decoding benchmark: selfkd's decode loop eager and compiled (--compile_decode) vs transformers +
peft generate, same weights, same prompts; the machine's bound; ops per decode step.

    .venv/bin/python bench/bench_decode.py [--reps 3] [--completion 64] [--batch 4]

The side-by-side shape of bench/bench_gkd.py (its model, checkpoint, LoRA with B randomised, and
prompts): hidden 256, 4 layers, 16 experts top-4, vocab 152064, batch 4 x 96 prompt tokens.

check    greedy tokens of selfkd eager, selfkd compiled and HF generate, equal or not.
time     sampling at temperature 2.0 (top_k 0, top_p 1), exactly --completion tokens, what an
         on-policy step does: selfkd's generate.generate (eager, then with generate.CompiledStep)
         and HF+peft generate (TRL's generation config), interleaved, medians; per decode step =
         (time - prefill time) / (completion - 1), the prefill timed alone (1 new token).
bound    the bytes of weights a decode step reads (every parameter but the embedding table, of
         which it reads B rows; all experts counted: at this shape 16 routed pairs per layer hit
         most of the 16) over the bandwidth of copying a buffer of that size (read + write,
         measured here, in the cache level that size lands in): the fastest a decode step could be.
ops      operations one decode step runs, from torch.profiler: eager, the top-level aten ops;
         compiled, inductor's fused kernels (cpp_fused_*) and the aten ops it still calls (mm,
         SDPA, the LM head), i.e. what would each be a launch on a GPU. And the kernels an eager
         decode step launches on a GPU at the released width (released_width_kernels).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests"), HERE]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import bench_gkd  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=96)
    p.add_argument("--completion", type=int, default=64)
    p.add_argument("--no-hf", action="store_true", help="skip transformers + peft")
    own = p.parse_args(argv)
    a = bench_gkd.parse_args(["--batch", str(own.batch), "--prompt", str(own.prompt), "--completion",
                              str(own.completion), "--threads", str(own.threads)])
    a.reps, a.no_hf = own.reps, own.no_hf
    return a


def timed(fn, reps=1):
    out = None
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, times


def launches(fn) -> int:
    """Top-level aten ops and inductor kernels of one call (see the module docstring)."""
    import torch._inductor.config as inductor_config
    from torch.profiler import profile

    inductor_config.cpp.enable_kernel_profile = True
    with profile() as prof:
        fn()
    count = 0
    for e in prof.events():
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(("aten::", "cpp_fused")):
            parent = parent.cpu_parent
        if e.name.startswith(("aten::", "cpp_fused")) and parent is None:
            count += 1
    return count


def released_width_kernels(batch: int, prompt: int, completion: int) -> tuple[int, dict]:
    """Kernels one eager decode step launches on a GPU at the released width (48 layers, 128 experts
    top-8, LoRA r8 on ALL, bf16): the step run on the meta device (shapes only, no data, seconds)
    under simulate.py's simulated GPU, which counts the ops that launch a kernel, with the kernels a
    CUDA build chooses (the grouped experts, SDPA's fused kernel)."""
    import model_qwen3omni as M
    import simulate
    from lora import inject_lora

    cfg, default = M.ThinkerConfig(), torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = M.Thinker(cfg)
            inject_lora(model, rank=8, alpha=16, dropout=0.05, targets="ALL", seed=0)
            cache = M.KVCache(cfg, batch, prompt + completion, torch.bfloat16, "meta")
    finally:
        torch.set_default_dtype(default)
    key_valid = torch.zeros(batch, prompt + completion, dtype=torch.bool, device="meta")
    ids = pos = torch.zeros(batch, 1, dtype=torch.long, device="meta")
    index = torch.tensor([prompt], device="meta")
    gpu = simulate.SimulatedGPU()
    with torch.no_grad(), simulate.cuda_choices((9, 0)), gpu:
        model.eval().lm_head(model.decode_step(ids, pos, cache, index, key_valid))
    ops = dict(gpu.costs["setup"].ops)
    return sum(ops.values()), ops


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from generate import CompiledStep, generate
    from model_qwen3omni import KVCache

    cfg = bench_gkd.model_config(a)
    path = bench_gkd.ensure_checkpoint(a, cfg)
    ours = bench_gkd.load_ours(a, path, cfg).eval()
    data = bench_gkd.make_data(a, cfg)
    print(f"# selfkd decoding: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_experts} experts "
          f"top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}, batch {a.batch} x {a.prompt} prompt tokens, "
          f"{a.completion} new; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU")
    lines = []
    compiled = CompiledStep(ours, lines.append)

    def ours_gen(step=None, temperature=a.temperature, n=a.completion):
        return generate(ours, data.prompt_ids, data.prompt_mask, n, eos_ids=[cfg.vocab_size], pad_id=0,
                        temperature=temperature, generator=torch.Generator().manual_seed(0), step=step)

    (greedy_eager, _), _ = timed(lambda: ours_gen(temperature=0.0))
    (greedy_compiled, _), first = timed(lambda: ours_gen(compiled, temperature=0.0))
    print(f"compile: first generate with the compiled step {first[0]:.1f} s ({lines[0] if lines else 'no log line'})")
    peer = None
    if not a.no_hf:
        peer = bench_gkd.load_peer(a, path, bench_gkd.adapter_dir(a, cfg, ours)).eval()
        greedy = bench_gkd.peer_generation_config(a)
        greedy.do_sample, greedy.temperature = False, None
        with torch.no_grad():
            hf = peer.generate(input_ids=data.prompt_ids, attention_mask=data.prompt_mask,
                               generation_config=greedy)[:, a.prompt:]
    same = torch.equal(greedy_eager, greedy_compiled)
    print(f"\n## check: greedy tokens, eager == compiled: {same}"
          + ("" if peer is None else f"; eager == HF+peft generate: {torch.equal(greedy_eager, hf)}"))

    variants = {"selfkd eager": lambda: ours_gen(), "selfkd compiled": lambda: ours_gen(compiled)}
    if peer is not None:
        sampling = bench_gkd.peer_generation_config(a)

        def hf_gen():
            with torch.no_grad():
                return peer.generate(input_ids=data.prompt_ids, attention_mask=data.prompt_mask,
                                     generation_config=sampling)
        variants["HF+peft generate"] = hf_gen
    for fn in variants.values():
        fn()  # warm-up
    times = {n: [] for n in variants}
    names = list(variants)
    for rep in range(a.reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            times[n].append(timed(variants[n])[1][0])
    _, prefill = timed(lambda: ours_gen(n=1), reps=a.reps)
    prefill = statistics.median(prefill)
    steps = a.completion - 1
    print(f"\n## time: {a.completion} tokens sampled at T {a.temperature}, medians of {a.reps} (prefill alone "
          f"{prefill * 1e3:.1f} ms)")
    print(f"{'variant':<18} {'median s':>9} {'tokens/s':>9} {'ms per decode step':>19}")
    medians = {n: statistics.median(t) for n, t in times.items()}
    for n in names:
        print(f"{n:<18} {medians[n]:9.3f} {a.batch * a.completion / medians[n]:9.1f} "
              f"{(medians[n] - prefill) / steps * 1e3:19.2f}")
    print(f"  compiled vs eager: {medians['selfkd eager'] / medians['selfkd compiled']:.2f}x"
          + ("" if peer is None else f"; compiled vs HF+peft: "
             f"{medians['HF+peft generate'] / medians['selfkd compiled']:.2f}x"))

    weights = [p for n, p in ours.named_parameters() if n != "embed_tokens.weight"]
    nbytes = sum(p.numel() * p.element_size() for p in weights)
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _, copy = timed(lambda: dst.copy_(src), reps=10)
    bandwidth = 2 * nbytes / min(copy)
    bound = nbytes / bandwidth
    per_step = (medians["selfkd compiled"] - prefill) / steps
    print(f"\n## bound: a decode step reads {nbytes / 1e6:.0f} MB of weights ({ours.lm_head.weight.numel() * 4 / 1e6:.0f} MB "
          f"of them the LM head); copying {nbytes / 1e6:.0f} MB runs at {bandwidth / 1e9:.1f} GB/s (read + write), "
          f"so reading them takes {bound * 1e3:.2f} ms; the compiled step takes {per_step * 1e3:.2f} ms "
          f"= {per_step / bound:.2f}x the bound")

    B, P = a.batch, a.prompt
    cache = KVCache(cfg, B, P + 64, torch.float32, "cpu")
    with torch.no_grad():
        ours(data.prompt_ids, data.prompt_mask, cache, return_hidden=True)
        key_valid = torch.zeros(B, P + 64, dtype=torch.bool)
        key_valid[:, :P] = True
        args = (data.prompt_ids[:, -1:], torch.full((B, 1), P), cache, torch.tensor([P]), key_valid)
        compiled(*args)
        eager_ops = launches(lambda: ours.decode_step(*args))
        compiled_ops = launches(lambda: compiled(*args))
    print(f"\n## ops per decode step (without the LM head and sampling): eager {eager_ops}, compiled {compiled_ops}")
    total, ops = released_width_kernels(4, 2048, 512)
    top = ", ".join(f"{n} {k}" for n, k in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
    print(f"released width (48 layers, 128 experts top-8, LoRA r8 ALL, bf16, batch 4, cache 2048 + 512; "
          f"meta device, GPU paths): {total} kernels per eager decode step, {total / 48:.0f} per layer ({top})")


if __name__ == "__main__":
    main()
