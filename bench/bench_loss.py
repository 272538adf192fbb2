"""Loss benchmark: selfkd's chunked GKD loss vs the TRL formula on whole logits, fwd + bwd.

    .venv/bin/python bench/bench_loss.py [--rows 640] [--vocab 152064] [--hidden 2048]

Shapes default to one micro-batch of Qwen3-Omni completions: 640 completion positions,
hidden 2048, vocab 152064, bf16 hidden states and lm_head (as in the model). Every variant
gets the same inputs in one process and reports seconds (median of --repeats) and peak memory
above what the inputs already hold: torch.cuda's peak counter on GPU, sampled RSS on CPU.

  selfkd chunked    chunked_jsd_loss_sum: logits chunk by chunk, gradient in the same pass
  selfkd whole      F.linear -> [N, V] bf16 logits -> jsd_loss_sum
  TRL fp32          F.linear -> [N, V] bf16 logits -> .float() -> TRL's generalized_jsd_loss
                    (autograd), i.e. the textbook formula computed in fp32

"grad rel diff" is against the first variant. The hidden-state gradients are bf16 (as the
model's would be), so ~3e-3 is one bf16 rounding: the [rows, V] x [V, H] gradient matmul is
blocked differently for a chunk than for all rows. CPU timings on a small machine are noisy
(large fresh allocations page-fault); peak memory is the stable figure. On CPU selfkd keeps its
logits buffers between calls (loss._scratch): the "held GiB" column is that memory, which the
peak (measured after a warm-up call) does not include.
"""

import argparse
import os
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import loss as loss_module  # noqa: E402
from loss import chunked_jsd_loss_sum, jsd_loss_sum  # noqa: E402


class PeakMemory:
    """Peak bytes allocated above the level at entry (CUDA counter, or sampled RSS on CPU)."""

    def __init__(self, device):
        self.device = device

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        self.bytes = self.peak - self.base


def selfkd_chunked(hs, ht, weight, mask, beta, temperature, chunk_size):
    h = hs.detach().requires_grad_()
    loss_sum, n = chunked_jsd_loss_sum(h, ht, weight, mask, beta, temperature, chunk_size)
    (loss_sum / n).backward()
    return loss_sum.item() / n, h.grad


def selfkd_whole(hs, ht, weight, mask, beta, temperature):
    h = hs.detach().requires_grad_()
    with torch.no_grad():
        teacher_logits = F.linear(ht, weight)
    loss_sum, n = jsd_loss_sum(F.linear(h, weight), teacher_logits, mask, beta, temperature)
    (loss_sum / n).backward()
    return loss_sum.item() / n, h.grad


def trl_fp32(hs, ht, weight, mask, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    h = hs.detach().requires_grad_()
    with torch.no_grad():
        teacher_logits = F.linear(ht, weight).float()
    labels = torch.where(mask, 0, -100)
    loss = GKDTrainer.generalized_jsd_loss(F.linear(h, weight).float(), teacher_logits,
                                           labels=labels, beta=beta, temperature=temperature)
    loss.backward()
    return loss.item(), h.grad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--chunk_sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip_trl", action="store_true", help="skip the whole-logits variants")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dtype = torch.bfloat16
    hs = torch.randn(args.rows, args.hidden, device=device, dtype=dtype)
    ht = (hs.float() + 0.3 * torch.randn_like(hs, dtype=torch.float32)).to(dtype)
    weight = (torch.randn(args.vocab, args.hidden, device=device) / args.hidden**0.5).to(dtype)
    mask = torch.ones(args.rows, dtype=torch.bool, device=device)
    common = (hs, ht, weight, mask, args.beta, args.temperature)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} "
          f"{'' if device.type == 'cuda' else 'cpu threads'}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"rows {args.rows}, hidden {args.hidden}, vocab {args.vocab}, bf16 hidden/lm_head, "
          f"beta {args.beta}, T {args.temperature}; one [rows, V] fp32 tensor = "
          f"{args.rows * args.vocab * 4 / 2**30:.2f} GiB")

    variants = [(f"selfkd chunked {c}", lambda c=c: selfkd_chunked(*common, c))
                for c in args.chunk_sizes]
    if not args.skip_trl:
        variants += [("selfkd whole", lambda: selfkd_whole(*common)),
                     ("TRL fp32", lambda: trl_fp32(*common))]

    reference = None
    print(f"{'variant':<22} {'seconds':>8} {'peak GiB':>9} {'held GiB':>9} {'loss':>12} {'grad rel diff':>14}")
    for name, run in variants:
        loss_module._CPU_SCRATCH.clear()
        run()  # warm-up
        times, peaks = [], []
        for _ in range(args.repeats):
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                loss, grad = run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            peaks.append(mem.bytes)
            del grad
        _, grad = run()
        if reference is None:
            reference = grad.float()
            diff = 0.0
        else:
            diff = float((grad.float() - reference).norm() / reference.norm())
        del grad
        held = sum(b.numel() * b.element_size() for b in loss_module._CPU_SCRATCH.values())
        print(f"{name:<22} {statistics.median(times):8.3f} {max(peaks) / 2**30:9.2f} {held / 2**30:9.2f} "
              f"{loss:12.6f} {diff:14.2e}")


if __name__ == "__main__":
    main()
