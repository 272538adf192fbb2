"""ZeRO-3 per rank, as DeepSpeed runs it: the 30B thinker on 8 fake ranks, no GPU, no weights.

    .venv/bin/python bench/bench_zero3_fake.py [--batch 4] [--max_length 2048] [--completion 512]

What it measures: rank 0's live tensor bytes, per phase of a dataset-branch training step of the
released Qwen3-Omni-30B-A3B thinker (text only) under DeepSpeed's own ZeRO-3 engine, world size 8,
with the ms-swift command's flags (bf16, LoRA r8 on ALL, batch 4, max_length 2048 = prompt 1536 +
completion 512, gradient checkpointing, --deepspeed zero3), against selfkd's memory plan for the
same flags (memory_plan.plan_for, the `--estimate_memory` table).

How: a "fake" process group (torch.testing's FakeStore: collectives return at once, nothing moves)
of 8 ranks, this process rank 0; every tensor is a FakeTensor (shape, dtype, device, no data), so
the 30B model is built by deepspeed.zero.Init and partitioned for real, only without memory. The
student is built as selfkd.build_student builds it for ZeRO-3 (minus loading weights), wrapped by
deepspeed.initialize with selfkd.deepspeed_config's zero3 preset, and stepped as selfkd.train_step
steps a dataset batch: zero3_new_step, gkd_loss_sums (teacher pass, student pass, chunked JSD with
lm_head gathered), engine.backward, engine.step. Written out here instead of calling train_step:
its loss-is-finite check reads values (.item()) that a fake cannot answer truthfully. Two steps
run: DeepSpeed records the fetch trace in the first and prefetches from the second, which is
measured. A TorchDispatchMode sees every storage an op creates and a weakref finalizer sees it go:
live bytes and the peak. At each new peak in the measured step the peak is split into this rank's
partitions (ds_tensor storages), persistent parameters (ds_persist, kept whole), gathered parameter
data (param.data of the others while gathered) and the rest (activations, gradients, buffers:
DeepSpeed's flat all-gather buffer counts here). Phases: teacher forward and student forward
(selfkd.completion_hidden, told apart by grad mode), loss (selfkd.gathered_lm_head: the gather, the
loss, the release), backward, optimizer step; "held" is what lives between the steps.

Patches, each in its own function below, and why:
  fake_process_group     the 8-rank fake group, then deepspeed.init_distributed on it
  patch_scalar_reads     fakes have no values: every .item() / tolist() answers 0 (False). The reads
                         that matter get the true answer that way: "no parameter was modified inside
                         GatheredParameters" (lm_head), DeepSpeed's norms (values only)
  patch_nonzero          `hidden[mask]` (loss.py) has a data-dependent shape: every element counts
                         as nonzero, as the all-ones masks here give
  patch_pads_last_layout the batch has no padding: attention runs causal without a mask, as on real
                         data (the scalar reads' 0 would build the [B, 1, T, T] boolean mask instead)
  patch_module_to        Module.to on fake parameters takes the swap_tensors path and fails; skip
                         the .to() calls that change nothing (DeepSpeed's move to its device)
  patch_rank_checks      reset_step compares the ranks' fetch traces by all-reduce: fakes disagree
  patch_moe_routing      fake router outputs carry no ranking: each expert gets an even share of the
                         routed rows (real routing is uneven; the total rows are the same)
  patch_loss_gpu_path    loss.py takes its GPU path (64-row blocks, no scratch buffers kept between
                         calls), as the plan's GPU figures assume; its CPU path holds 2 [1024, V]
                         logits buffers all run and uses 2-row blocks
Caveats: the fakes live on the CPU (DS_ACCELERATOR=cpu): the experts take the per-expert loop, not
the GPU's grouped matmul, so the MoE block's saved activations and transients differ from a GPU's
(the loop keeps per-expert pieces that the grouped path keeps as whole tensors); SDPA is the CPU
kernel's; LoRA dropout masks are the CPU's. Scalar reads answer a constant, so values (loss, grad
norm) are meaningless and no branch on a value is exercised. Bytes are storages' sizes, not an
allocator's: no CUDA context, caching or fragmentation. Communication buffers of a real backend
(NCCL) are not counted; the fake group allocates nothing.
"""
import argparse
import gc
import os
import sys
import time
import warnings
import weakref
from contextlib import contextmanager

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="8", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555",
                  DS_ACCELERATOR="cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import flags  # noqa: E402
import memory_plan  # noqa: E402
import selfkd  # noqa: E402
from chat import Batch  # noqa: E402
from lora import inject_lora, lora_parameters  # noqa: E402
from model_qwen3omni import SparseMoE, Thinker, ThinkerConfig  # noqa: E402

WORLD, GiB, aten = 8, 2**30, torch.ops.aten


def fake_process_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as selfkd.init_distributed
    deepspeed.init_distributed(dist_backend="gloo")  # takes the existing (fake) group


def patch_scalar_reads():
    from torch._subclasses import fake_impls
    for op in (aten._local_scalar_dense.default, aten.item.default):
        fake_impls.op_implementations_dict[op] = lambda mode, func, t: (
            False if t.dtype == torch.bool else 0.0 if t.dtype.is_floating_point else 0)


def patch_nonzero():
    from torch._subclasses import fake_impls
    fake_impls.op_implementations_dict[aten.nonzero.default] = lambda mode, func, t: t.new_empty_strided(
        (t.numel(), t.dim()), (1, t.numel()), dtype=torch.int64)


def patch_pads_last_layout():
    import model_qwen3omni
    model_qwen3omni.pads_last_layout = lambda attention_mask: (True, None)


def patch_module_to():
    orig = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if all((device is None or t.device == torch.device(device)) and (dtype is None or t.dtype == dtype)
               for t in [*self.parameters(), *self.buffers()]):
            return self
        return orig(self, *args, **kwargs)
    torch.nn.Module.to = to


def patch_rank_checks():
    import deepspeed.runtime.zero.partitioned_param_coordinator as ppc
    ppc.assert_ints_same_as_other_ranks = lambda ints: None


def patch_moe_routing():
    from model_qwen3omni import Experts
    loop = Experts.forward_loop
    Experts.forward_loop = lambda self, x, counts: loop(self, x, [x.shape[0] // self.num_experts + (
        e < x.shape[0] % self.num_experts) for e in range(self.num_experts)])
    Experts.use_grouped = lambda self, x: False


def patch_loss_gpu_path():
    import loss
    loss.ROWS_PER_BLOCK.pop("cpu", None)
    loss._scratch = lambda name, shape, dtype, device: torch.empty(shape, dtype=dtype, device=device)


class StorageTracker(TorchDispatchMode):
    """Live bytes of the storages ops create (a finalizer per storage), the peak, and at each new
    peak, when `split` is set, split() of that moment."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen, self.split, self.peak_split = set(), None, {}

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and (st := t.untyped_storage())._cdata not in self.seen:
                self.seen.add(st._cdata)
                self.live += st.nbytes()
                weakref.finalize(st, self._free, st._cdata, st.nbytes())
                if self.live > self.peak:
                    self.peak = self.live
                    if self.split:
                        self.peak_split = self.split()
        return out


def parameter_split(params):
    """-> bytes of {partitions, persistent, gathered}: distinct storages held by the ZeRO-3 params."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    def split():
        seen, out = set(), dict.fromkeys(("partitions", "persistent", "gathered"), 0)
        for p in params:
            here = [("partitions", p.ds_tensor)]
            if p.ds_status != ZeroParamStatus.NOT_AVAILABLE:
                here.append(("persistent" if p.ds_persist else "gathered", p.data))
            for kind, t in here:
                st = t.untyped_storage()
                if st._cdata not in seen:
                    seen.add(st._cdata)
                    out[kind] += st.nbytes()
        return out
    return split


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--model", default="configs/Qwen3-Omni-30B-A3B-Instruct")
    a.add_argument("--batch", type=int, default=4, help="--per_device_train_batch_size")
    a.add_argument("--max_length", type=int, default=2048)
    a.add_argument("--completion", type=int, default=512, help="--max_completion_length")
    args = a.parse_args(argv)
    cfg = flags.parse_args(["--dataset", "data/sample_alpaca.jsonl", "--model", args.model, "--torch_dtype", "bfloat16",
                            "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
                            "--lora_target_modules", "ALL", "--max_length", str(args.max_length),
                            "--max_completion_length", str(args.completion),
                            "--per_device_train_batch_size", str(args.batch), "--deepspeed", "zero3"])
    ds = selfkd.deepspeed_config(cfg, torch.bfloat16, world_size=WORLD)
    plan = memory_plan.plan_for(cfg, ds, WORLD, towers=False, persistent_numel=selfkd.ZERO3_PERSISTENT_NUMEL)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated collectives, per call
    t0 = time.time()
    fake_process_group()
    import deepspeed
    from torch._subclasses.fake_tensor import FakeTensorMode
    for patch in (patch_scalar_reads, patch_nonzero, patch_pads_last_layout, patch_module_to, patch_rank_checks,
                  patch_moe_routing, patch_loss_gpu_path):
        patch()
    tracker = StorageTracker()
    with FakeTensorMode(allow_non_fake_inputs=True), tracker:
        # selfkd.build_student for ZeRO-3, without load_weights
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = Thinker(ThinkerConfig.from_pretrained(cfg.model))
        deepspeed.utils.set_z3_leaf_modules(model, [SparseMoE])
        inject_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, ",".join(cfg.lora_target_modules),
                    seed=cfg.seed, freeze_vit=cfg.freeze_vit, freeze_aligner=cfg.freeze_aligner)
        for _, p in lora_parameters(model):
            p.data = p.data.to(dtype=torch.bfloat16)
        for p in model.parameters():
            if hasattr(p, "ds_id") and not p.requires_grad and p.ds_numel <= selfkd.ZERO3_PERSISTENT_NUMEL:
                p.ds_persist = True
        model.gradient_checkpointing = cfg.gradient_checkpointing
        optimizer = torch.optim.AdamW([p for _, p in lora_parameters(model)], lr=cfg.learning_rate)
        engine = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)[0]
        print(f"built and initialized in {time.time() - t0:.0f} s; live {tracker.live / GiB:.2f} GiB", flush=True)

        peaks = {}  # phase -> (peak bytes, split at the peak)

        @contextmanager
        def phase(name):
            tracker.peak = tracker.live
            tracker.peak_split = tracker.split() if tracker.split else {}
            yield
            peaks[name] = (tracker.peak, tracker.peak_split)

        hidden, gathered_lm_head = selfkd.completion_hidden, selfkd.gathered_lm_head

        def completion_hidden(*a, **k):
            with phase("student forward" if torch.is_grad_enabled() else "teacher forward"):
                return hidden(*a, **k)

        @contextmanager
        def loss_phase(model):
            with phase("loss"), gathered_lm_head(model) as w:
                yield w
        selfkd.completion_hidden, selfkd.gathered_lm_head = completion_hidden, loss_phase

        B, C, dev = args.batch, args.completion, engine.device
        P, V = args.max_length - C, engine.module.cfg.vocab_size
        def ids(n):
            return torch.randint(0, V, (B, n), device=dev)

        def ones(n):  # every mask 1: no padding
            return torch.ones(B, n, dtype=torch.long, device=dev)
        batch = Batch(ids(P), ones(P), ids(P), ones(P), ids(C), ones(C))  # student prompt, teacher prompt, completion
        for step in range(2):  # as selfkd.train_step, dataset branch, one micro-batch
            t = time.time()
            if step == 1:
                gc.collect()
                held = tracker.live
                tracker.split = parameter_split([p for p in engine.module.parameters() if hasattr(p, "ds_id")])
            selfkd.zero3_new_step(engine)
            tokens = WORLD * B * C  # train_step's all_reduce_sum of the completion masks (all ones)
            jsd, _, _ = selfkd.gkd_loss_sums(engine, batch, batch.completion_ids, batch.completion_mask, cfg.beta,
                                             cfg.temperature, with_sft=False)
            loss = jsd * WORLD / tokens
            del jsd
            with phase("backward"):
                engine.backward(loss, scale_wrt_gas=False)
            del loss
            with phase("optimizer step"):
                engine.step()
            trace = selfkd.zero3_offload(engine).get_param_coordinator().is_complete_trace()
            print(f"step {step + 1}: {time.time() - t:.0f} s, ran on a complete fetch trace (prefetching): {trace}",
                  flush=True)
        gc.collect()
        after = tracker.live

    plans = {p.name: plan.total(p) for p in plan.phases}
    rows = [("held (between steps)", held, plan.held.gpu_bytes(), {})]
    rows += [(name, peaks[name][0], plans.get(ref), peaks[name][1]) for name, ref in (
        ("teacher forward", None), ("student forward", None), ("loss", "loss"),
        ("backward", "forward + backward"), ("optimizer step", None))]
    print(f"\nrank 0 of {WORLD}, ZeRO-3, batch {B} x {args.max_length} (prompt {P} + completion {C}); "
          f"live tensor bytes, GiB (measured: step 2 of 2)")
    print(f"{'phase':<22}{'DeepSpeed':>10}{'plan':>8}{'diff':>8}   peak split: partitions / persistent / "
          f"gathered / rest")
    for name, got, want, split in rows:
        plan_s = f"{want / GiB:8.2f}{(got - want) / GiB:+8.2f}" if want is not None else f"{'-':>8}{'':>8}"
        parts = " / ".join(f"{v / GiB:.2f}" for v in [*split.values(), got - sum(split.values())]) if split else ""
        print(f"{name:<22}{got / GiB:10.2f}{plan_s}   {parts}")
    print(f"held after step 2: {after / GiB:.2f} GiB")
    print(f"wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
