"""Attention with and without the boolean mask: selfkd's whole-sequence forward + backward.

    .venv/bin/python bench/bench_attention.py [--device cpu|cuda] [--dtype bfloat16] [--batch 4]
        [--prompt 512] [--completion 512] [--layers 2] [--reps 5]

The trainer's batch layout: prompts left-padded (row b loses b * prompt / (2 * batch) tokens on
the left), completions right-padded (row b ends b * completion / (2 * batch) tokens early), so
every row but the first has pads at both ends. Thinker.forward runs it two ways:
  masked     causal_without_mask = False: SDPA with the boolean [B, 1, T, T] padding + causal mask
             (on a GPU: the memory-efficient or math kernel; FlashAttention takes no mask)
  unmasked   the default: each row's left pads rolled behind its tokens, SDPA with is_causal and
             no mask (on a GPU: FlashAttention where the shapes allow)
The model has the real attention width (hidden 2048, 32 query / 4 kv heads x 128) and dense MLP
layers (mlp_only_layers), so the MoE does not drown the attention time; LoRA r8 on q, k, v, o, as
in training. Reported: hidden states at the real tokens and LoRA gradients, unmasked vs masked
(relative difference), the median fwd+bwd time of each (interleaved), and on CUDA the SDPA
kernels the profiler saw.
"""

import argparse
import os
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import inject_lora, lora_parameters  # noqa: E402
from model_qwen3omni import Thinker, ThinkerConfig  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--completion", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = ThinkerConfig(vocab_size=4096, num_hidden_layers=a.layers, mlp_only_layers=list(range(a.layers)),
                        intermediate_size=768)
    torch.manual_seed(0)
    with torch.device(device):
        model = Thinker(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else p.shape[-1] ** -0.5 * torch.randn_like(p))
    inject_lora(model, rank=8, alpha=16, dropout=0.0, targets="q_proj,k_proj,v_proj,o_proj")
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if name.endswith("B"):
                p.normal_(0, 0.01)
    model.to(dtype).train()

    B, P, C = a.batch, a.prompt, a.completion
    T = P + C
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    for b in range(B):
        mask[b, :b * P // (2 * B)] = 0
        mask[b, T - b * C // (2 * B):] = 0
    real = mask.bool()
    lora = [p for _, p in lora_parameters(model)]

    def run(unmasked):
        model.causal_without_mask = unmasked
        for p in lora:
            p.grad = None
        hidden = model(ids, mask, return_hidden=True)
        hidden[real].float().square().mean().backward()
        return hidden.detach(), [p.grad.clone() for p in lora]

    def rel(x, y):
        return ((x.float() - y.float()).norm() / y.float().norm()).item()

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if cuda else 'cpu'}, {a.dtype}; "
          f"batch {B} x (prompt {P} left-padded + completion {C} right-padded), {a.layers} layers, hidden "
          f"{cfg.hidden_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads x {cfg.head_dim}; "
          f"{int(real.sum())} of {B * T} tokens real")
    h_m, g_m = run(False)
    h_u, g_u = run(True)
    print(f"unmasked vs masked: hidden at real tokens rel {rel(h_u[real], h_m[real]):.2e}, LoRA grads rel "
          f"(max over tensors) {max(rel(x, y) for x, y in zip(g_u, g_m)):.2e}")
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        for unmasked in (False, True):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run(unmasked)
                sync()
            names = sorted({e.name for e in prof.events() if "flash" in e.name.lower() or "fmha" in e.name.lower()
                            or "attention" in e.name.lower() or "efficient" in e.name.lower()})
            print(f"{'unmasked' if unmasked else 'masked':8s} SDPA kernels: {'; '.join(n[:90] for n in names)}")
    times = {False: [], True: []}
    for r in range(a.reps):
        for unmasked in ((False, True) if r % 2 == 0 else (True, False)):
            sync()
            t = time.perf_counter()
            run(unmasked)
            sync()
            times[unmasked].append(time.perf_counter() - t)
    m, u = statistics.median(times[False]), statistics.median(times[True])
    print(f"fwd+bwd median of {a.reps}: masked {m * 1e3:.1f} ms, unmasked {u * 1e3:.1f} ms (masked / unmasked "
          f"{m / u:.2f}x)")
    print("command: " + shlex.join([os.path.relpath(sys.executable)] + sys.argv))


if __name__ == "__main__":
    main()
