"""The training step of the ms-swift command on simulated GPUs: selfkd's CUDA path executed
without a GPU, its memory measured and its time estimated.

    bash run.sh check --simulate_gpu h100 [--nproc_per_node 8] <the training flags>
    python selfkd.py --simulate_gpu h200 --world_size 8 <the training flags>

builds the thinker from config.json alone in bf16 with LoRA as the flags say, on torch's meta
device (tensors with shape, dtype and strides, no storage), and runs selfkd's own code on it:
`selfkd.train_step` for the dataset branch and for the on-policy one (selfkd.sample_completions
-> generate.generate: the prefill and max_completion_length decode steps on the KV cache), the
teacher and student passes, the chunked loss, the backward and an optimizer step, then
`lora.adapter_tensors` (a checkpoint's tensors). A shape, dtype or device mistake in the CUDA path
fails here as it would on the GPU: meta kernels check what CUDA kernels check (grouped_mm: bf16,
16-byte rows), and a tensor left on the CPU meets the model's "device" and fails.

A CPU cannot answer three things; they are given here and nowhere else:
  - what a CUDA build chooses (cuda_choices): grouped_mm_pays answers as for CUDA tensors on the
    card (asked on fake CUDA tensors with its compute capability); SDPA runs the fused kernel a GPU
    runs (FlashAttention without a mask, the memory-efficient one with a mask) instead of the math
    decomposition meta would take (it would materialize [B, heads, T, T]); dropout runs the fused
    kernel (a boolean mask, not one in the input's dtype);
  - the values the host reads: integer and boolean tensors carry their values (computed on the
    CPU beside the meta tensor: token ids, masks, positions, counts, routing); floats have none
    and read as 0. So routing sends every token to the first top-k experts (shapes do not depend
    on routing on the grouped path), and sampling picks token 0 and never meets an eos: every
    generation runs all max_completion_length steps, the longest case;
  - the peers: a fake process group of --world_size ranks (collectives return at once); the
    engine is `SimulatedEngine`, DeepSpeed's bf16 ZeRO optimizer in its tensors (below).

Why meta and not FakeTensorMode on device "cuda": on a CPU-only torch, Python indexing of a
fake CUDA tensor (x[:, :1]) takes a CUDA device guard and fails; meta needs none. torch's
MemTracker (torch.distributed._tools.mem_tracker) measures memory: every live storage by
category, its peak per phase. Its RuntimeEstimator needs a CUDA device; the roofline here is
its formula (FLOPs from torch.utils.flop_counter, bytes read and written) with the card's
datasheet figures in GPUS.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakTensorKeyDictionary

import model_qwen3omni as M

aten = torch.ops.aten
GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense tensor-core FLOP/s
    fp32_flops: float  # FP32 without tensor cores (torch's default matmul precision for fp32)
    hbm: float  # memory bandwidth, bytes/s
    nvlink: float  # bytes/s per direction to the node's other GPUs
    memory_gib: float  # what a process can allocate (memory_plan.CARDS)
    capability: tuple[int, int]


# NVIDIA datasheets, SXM parts. H200 = H100's compute with faster, larger HBM3e.
GPUS = {
    "h100": GPU("H100 SXM 80GB", 989e12, 67e12, 3.35e12, 450e9, 79.0, (9, 0)),
    "h200": GPU("H200 SXM 141GB", 989e12, 67e12, 4.8e12, 450e9, 139.0, (9, 0)),
}
COMPUTE_EFFICIENCY = 0.75  # of the datasheet FLOP/s a large GEMM reaches (torch's runtime estimator assumes the same)
# Eager PyTorch costs the host ~5 us per CUDA op (Python, dispatcher, launch; 4-10 us on server CPUs):
# a phase of many small kernels is bound by it, not by the GPU.
LAUNCH_SECONDS = 5e-6
UNINITIALIZED = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}  # no values to carry
VALUE_NUMEL = 1 << 22  # tensors up to this size carry values on the CPU beside the meta tensor
# ops whose memory traffic is the rows they touch, not the whole tensor they index
GATHERS = {"embedding", "index", "index_select", "gather"}
SCATTERS = {"index_copy_", "index_put_", "_index_put_impl_", "index_fill_", "scatter_", "scatter_add_"}
# ops that launch no kernel: views, metadata, allocation without initialization
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "expand", "as_strided", "unsqueeze", "squeeze", "slice",
             "select", "alias", "permute", "split", "split_with_sizes", "unbind", "detach", "_reshape_alias",
             "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "diagonal",
             "unfold", "view_as_real", "view_as_complex", "set_", "resize_"}


# ----------------------------------------------------------------------------------------------
# What runs on the "GPU": the ops, their values where the host reads them, their cost


def _is_float(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point or t.dtype.is_complex


def grouped_mm_flops(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> int:
    """FLOPs of torch._grouped_mm with offsets: each row of the output is one row of a group's
    GEMM. Forward / input gradient: a [M, K] x b [G, K, N] -> [M, N]; weight gradient: a [K, M] x
    b [M, N] -> [G, K, N] (the groups split M)."""
    if out.dim() == 2:
        return 2 * a.shape[0] * a.shape[1] * out.shape[1]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def distinct_experts(rows: int, experts: int) -> float:
    """Expected experts that receive at least one of `rows` routed rows under uniform routing: a
    grouped GEMM reads only their weights (a decode step of 4 tokens x top-8 reads ~28 of 128)."""
    return experts * (1 - (1 - 1 / experts) ** rows)


@dataclass
class PhaseCost:
    """What a phase launched: kernels, FLOPs, and per card its roofline seconds (each op at
    max(FLOPs / peak, bytes / bandwidth)), in total and by op."""
    launches: int = 0
    flops: float = 0.0
    ops: Counter = field(default_factory=Counter)  # op name -> launches
    seconds: Counter = field(default_factory=Counter)  # card -> roofline seconds
    op_seconds: Counter = field(default_factory=Counter)  # (card, op name) -> roofline seconds

    def snapshot(self) -> "PhaseCost":
        return PhaseCost(self.launches, self.flops, Counter(self.ops), Counter(self.seconds), Counter(self.op_seconds))

    def add(self, before: "PhaseCost", after: "PhaseCost", times: int):
        """What happened between two snapshots, `times` more times."""
        self.launches += times * (after.launches - before.launches)
        self.flops += times * (after.flops - before.flops)
        for mine, a, b in ((self.ops, after.ops, before.ops), (self.seconds, after.seconds, before.seconds),
                           (self.op_seconds, after.op_seconds, before.op_seconds)):
            for key in a:
                mine[key] += times * (a[key] - b[key])


class SimulatedGPU(TorchDispatchMode):
    """Runs every op on meta; keeps CPU values for small tensors (answers .item(), .tolist(),
    boolean indexing); counts kernel launches and roofline time per phase (`phase`)."""

    def __init__(self, gpus: dict[str, GPU] = GPUS):
        super().__init__()
        self.gpus, self.values, self.costs, self.current = gpus, WeakTensorKeyDictionary(), {}, "setup"

    @contextmanager
    def phase(self, name: str):
        before, self.current = self.current, name
        self.costs.setdefault(name, PhaseCost())
        try:
            yield self.costs[name]
        finally:
            self.current = before

    # values ---------------------------------------------------------------------------------

    def value(self, t: torch.Tensor) -> torch.Tensor:
        """The CPU value of a meta tensor; zeros where it has none (a float the simulation did not compute)."""
        if t.device.type != "meta":
            return t
        v = self.values.get(t)
        return v if v is not None else torch.zeros(t.shape, dtype=t.dtype)

    def to_meta(self, v: torch.Tensor) -> torch.Tensor:
        out = v.to("meta")  # through the modes below: the memory tracker sees the allocation
        self.values[out] = v
        return out

    def known_indices(self, indices):
        """Boolean index tensors -> their nonzero positions (long tensors with values), as CUDA does."""
        out = []
        for i in indices:
            if i is not None and i.dtype == torch.bool:
                out += [self.to_meta(x) for x in self.value(i).nonzero().unbind(1)]
            else:
                out.append(i)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:  # .item(), int(), bool(): a device-to-host read
            self.count(func, args, kwargs, None)
            return self.value(args[0]).item()
        if func is aten._to_copy.default and args[0].device.type == "meta" and kwargs.get("device") not in (
                None, torch.device("meta")):  # .cpu(), .tolist()
            t, to = args[0], {k: x for k, x in kwargs.items() if k in ("dtype", "device")}
            with _disable_current_modes():
                if t.numel() > VALUE_NUMEL and t not in self.values:  # e.g. the adapter's weights, to be written
                    return torch.empty(t.shape, dtype=t.dtype).to(**to)
                return self.value(t).clone().to(**to)
        if func is aten.nonzero.default:
            self.count(func, args, kwargs, None)
            return self.to_meta(self.value(args[0]).nonzero())
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
            args = (args[0], self.known_indices(args[1]), *args[2:])
        out = func(*args, **kwargs)
        self.count(func, args, kwargs, out)
        self.carry_values(func, args, kwargs, out)
        return out

    def carry_values(self, func, args, kwargs, out):
        """The op again on the CPU values of its inputs, for its small outputs: integer and boolean
        ones always (zeros stand in for inputs without values), floats when every input has one."""
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type == "meta"]
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return
        known = all(t.device.type != "meta" or t in self.values for t in inputs)
        small = all(t.numel() <= VALUE_NUMEL for t in outs + inputs if t.device.type == "meta")
        if (not small or func.overloadpacket.__name__ in UNINITIALIZED or "generator" in kwargs
                or not known and all(_is_float(t) for t in outs)):
            for t in inputs:  # written in place: what it held is gone
                if any(t is o for o in outs):
                    self.values.pop(t, None)
            return

        def on_cpu(x):
            if isinstance(x, torch.Tensor) and x.device.type == "meta":
                v = self.values.get(x)
                if v is None:
                    v = torch.zeros(x.shape, dtype=x.dtype)
                    if any(x is o for o in outs):  # mutated in place: it carries a value from now on
                        self.values[x] = v
                return v
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            return x

        with _disable_current_modes():
            try:
                res = func(*tree_map(on_cpu, args), **tree_map(on_cpu, kwargs))
            except NotImplementedError:  # a GPU-only kernel (FlashAttention's seeds): no values
                return
        for t, v in zip(tree_flatten(out)[0], tree_flatten(res)[0]):
            if isinstance(t, torch.Tensor) and t.device.type == "meta" and (known or not _is_float(t)):
                self.values[t] = v

    # cost -----------------------------------------------------------------------------------

    def count(self, func, args, kwargs, out):
        name = func.overloadpacket.__name__
        if name in NO_KERNEL:
            return
        cost = self.costs.setdefault(self.current, PhaseCost())
        cost.launches += 1
        cost.ops[name] += 1
        if out is None:
            return
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        nbytes = [size(t) for t in tensors + outs]
        if name in GATHERS:  # reads only the rows it returns
            nbytes[0] = sum(size(t) for t in outs)
        elif name in SCATTERS:  # reads and writes only the rows it is given, in place
            nbytes = [2 * size(t) for t in tensors[1:]]
        flops = 0
        if name == "_grouped_mm":
            a, b = args[0], args[1]
            flops = grouped_mm_flops(a, b, outs[0])
            if b.dim() == 3:  # the weight stack: only the experts that get rows are read
                rows = a.shape[0]
                nbytes[1] = size(b) * distinct_experts(rows, b.shape[0]) / b.shape[0]
        elif func.overloadpacket in flop_registry:
            flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        fp32 = outs and outs[0].dtype == torch.float32
        cost.flops += flops
        for key, gpu in self.gpus.items():
            peak = (gpu.fp32_flops if fp32 else gpu.bf16_flops) * COMPUTE_EFFICIENCY
            seconds = max(flops / peak, sum(nbytes) / gpu.hbm)
            cost.seconds[key] += seconds
            cost.op_seconds[key, name] += seconds


class HostData(TorchFunctionMode):
    """torch.tensor(data, device="meta") keeps no data (meta copies nothing): made on the CPU and
    moved, so that the copy reaches SimulatedGPU, which keeps the values."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and str(kwargs.get("device", "")).startswith("meta"):
            return func(*args, **{**kwargs, "device": "cpu"}).to("meta")
        return func(*args, **kwargs)


def gpu_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as a CUDA build dispatches it for selfkd's calls (bf16, head
    dim 128, no dropout): FlashAttention-2 without a mask (it maps the GQA heads itself), the
    memory-efficient kernel with a boolean mask (as an additive bias, k and v expanded to the
    query heads)."""
    if attn_mask is None:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    groups = query.shape[1] // key.shape[1]
    bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~attn_mask, float("-inf"))
    bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    return aten._scaled_dot_product_efficient_attention(query, key, value, bias, False, dropout_p, is_causal,
                                                        scale=scale)[0]


def gpu_dropout(input, p=0.5, training=True, inplace=False):
    """F.dropout as CUDA runs it: the fused kernel, whose mask for the backward is boolean (a CPU's,
    and meta's, is in the input's dtype: twice the memory in bf16)."""
    if not training or p == 0:
        return input
    return torch.native_dropout(input, p, True)[0]


_ON_THE_CARD: dict = {}


@contextmanager
def cuda_choices(capability: tuple[int, int]):
    """What a CUDA build chooses, forced for the simulation and undone after: grouped_mm_pays
    answers for meta tensors what it answers for CUDA tensors of the same shapes and dtypes on a
    card of this compute capability; SDPA is gpu_sdpa, dropout gpu_dropout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real_pays, sdpa, dropout = M.grouped_mm_pays, F.scaled_dot_product_attention, F.dropout

    def on_the_card(x, weights) -> bool:
        key = (capability, *((tuple(t.shape), t.dtype) for t in (x, *weights)))
        if key not in _ON_THE_CARD:
            with _disable_current_modes(), FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # grouped_mm_aligned reads data pointers: a fake one's is 0
                fake = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (x, *weights)]
                real_capability = torch.cuda.get_device_capability
                torch.cuda.get_device_capability = lambda *a: capability
                try:
                    _ON_THE_CARD[key] = real_pays(fake[0], fake[1:])
                finally:
                    torch.cuda.get_device_capability = real_capability
        return _ON_THE_CARD[key]

    M.grouped_mm_pays, F.scaled_dot_product_attention, F.dropout = on_the_card, gpu_sdpa, gpu_dropout
    try:
        yield
    finally:
        M.grouped_mm_pays, F.scaled_dot_product_attention, F.dropout = real_pays, sdpa, dropout


# ----------------------------------------------------------------------------------------------
# DeepSpeed's optimizer, in its tensors


class SimulatedEngine:
    """What selfkd.train_step asks of DeepSpeed's engine (module, optimizer.param_groups, backward,
    step, get_global_grad_norm), holding on one rank of `world` the tensors DeepSpeed 0.19's bf16
    ZeRO optimizer holds, when it holds them (`zero`: memory_plan.Zero, from the DeepSpeed config):
    the fp32 master copy of this rank's 1/world of the LoRA weights (one flat partition) and AdamW's
    two moments on it, made at initialization as DeepSpeed does; the gradient partition the
    reduce-scatter fills and the reduce bucket(s): ZeRO-3 keeps them from initialization on, ZeRO-2
    makes them at the first gradient and drops them after the step. Each LoRA gradient goes into the
    partition as backward produces it and is dropped (DeepSpeed's hooks). The step: the global norm
    clipped to 1, AdamW, the new weights back into every LoRA parameter."""

    def __init__(self, model, world: int, lr: float, zero):
        from lora import lora_parameters

        self.module, self.zero = model, zero
        self.params = [p for _, p in lora_parameters(model)]
        numel = sum(p.numel() for p in self.params)
        self.shard = math.ceil(numel / world)
        self.master = torch.nn.Parameter(torch.zeros(self.shard, dtype=torch.float32, device="meta"))
        self.optimizer = torch.optim.AdamW([self.master], lr=lr, foreach=True)
        self.master.grad = torch.zeros_like(self.master)
        self.optimizer.step()  # the moments exist from the start (DeepSpeed's _initialize_optimizer_states)
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_partition, self.buckets = None, []
        if zero.stage == 3:
            self.buffers()
        self.norm, self.track = None, lambda *tensors: None  # track: the memory tracker's, for buffers made later
        for p in self.params:  # as DeepSpeed's hooks do: each gradient reduced into the partition as it comes
            p.register_post_accumulate_grad_hook(self.reduce)

    def buffers(self):
        """The gradient partition and reduce bucket(s) (flat, in the gradients' dtype); ZeRO-3: now, for good."""
        bucket = self.zero.reduce_bucket * self.zero.contiguous_gradients
        count = 1 if self.zero.stage == 3 else 1 + self.zero.overlap_comm
        self.grad_partition = torch.zeros(self.shard, dtype=torch.bfloat16, device="meta")
        self.buckets = [torch.empty(bucket, dtype=torch.bfloat16, device="meta") for _ in range(count)]

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas=False):
        if self.grad_partition is None:
            with _disable_current_modes():  # made aside, then tracked as buffers, not as the backward's temporaries
                self.buffers()
            self.track(self.grad_partition, *self.buckets)
        loss.backward()

    def reduce(self, p):
        n = min(p.numel(), self.shard)
        self.grad_partition[:n].add_(p.grad.reshape(-1)[:n])  # this rank's part of the reduce-scatter
        p.grad = None

    def step(self):
        self.master.grad = self.grad_partition.float()
        self.norm = torch.linalg.vector_norm(self.master.grad)
        self.master.grad.mul_(torch.clamp(1.0 / (self.norm + 1e-6), max=1.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_partition.zero_()
        if self.zero.stage != 3:
            self.grad_partition, self.buckets = None, []
        weights = self.master.detach().to(torch.bfloat16)  # all-gathered into every rank's LoRA weights
        with torch.no_grad():
            for p in self.params:
                p.copy_(weights[0].expand(p.shape))

    def get_global_grad_norm(self):
        return self.norm


# ----------------------------------------------------------------------------------------------
# One simulated rank's training step


def by_name(snapshot: dict) -> dict[str, int]:
    """A MemTracker snapshot of one device keyed by category name ("Parameter", ..., "Total")."""
    return {getattr(k, "value", k): v for k, v in snapshot.items()}


class StepMemory(MemTracker):
    """torch's MemTracker, keeping what the phases read: the device's live storages by category and
    their peak. Its per-module records are off: it refuses a module called twice, and a step calls
    the model for the teacher, the student and every decode step."""

    def _pre_fw_hook(self, module, inputs):
        pass

    def _post_fw_hook(self, module, inputs, outputs):
        pass

    def _pre_bw_hook(self, module, args):
        pass

    def _post_bw_hook(self, module, args):
        pass

    def track(self, model, optimizer, master, *tensors):
        """The model's parameters, the optimizer's state and the weights it steps (`master`), other
        tensors made before, and the gradients as they come."""
        from torch.distributed._tools.mem_tracker import _MemRefType

        self._update_and_maybe_create_winfos(master, _MemRefType.OPT)

        def grad_hook(grad) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        self.track_external(model, optimizer, *tensors)
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(grad_hook)

    def now(self) -> dict[str, int]:
        return by_name(self.get_tracker_snapshot("current").get(torch.device("meta"), {}))

    @contextmanager
    def peak_of(self, into: dict):
        """The device's peak inside the block, by category, into `into` (the largest seen if repeated)."""
        meta = torch.device("meta")
        outer_peak, outer_snap = dict(self._peak_mem), dict(self._peak_mem_snap)
        current = self.get_tracker_snapshot("current")
        self._peak_mem_snap = current
        self._peak_mem = {dev: snap["Total"] for dev, snap in current.items()}
        try:
            yield
        finally:
            peak = self._peak_mem_snap.get(meta, {})
            if peak.get("Total", 0) > into.get("Total", 0):
                into.clear()
                into.update(by_name(peak))
            for dev, value in outer_peak.items():  # the outer block's peak includes this one
                if self._peak_mem.get(dev, 0) < value:
                    self._peak_mem[dev], self._peak_mem_snap[dev] = value, outer_snap[dev]


@dataclass
class StepReport:
    costs: dict  # phase -> PhaseCost
    memory: dict  # phase -> {category: bytes} at the phase's peak
    held_after: dict  # {category: bytes} live after the step and the save: what stays from step to step
    params: list  # (elements, trainable, bytes per element) of every parameter, as built


PHASES = ("generation", "teacher forward", "student forward", "loss", "backward", "optimizer step",
          "checkpoint save")


@contextmanager
def fake_group(world: int):
    """A process group of `world` ranks that are not there (torch's fake backend: collectives return
    at once). Each is taken to hold what this one holds, so an all-reduce's sum is world times the
    value here, its min and max the value itself."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist, all_reduce = torch.distributed, torch.distributed.all_reduce

    def same_ranks_all_reduce(t, op=dist.ReduceOp.SUM, group=None, async_op=False):
        work = all_reduce(t, op=op, group=group, async_op=async_op)
        if op == dist.ReduceOp.SUM:
            t.mul_(dist.get_world_size(group))
        return work

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    dist.all_reduce = same_ranks_all_reduce
    try:
        yield
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()


def simulate_step(cfg, mcfg, world: int, branch: str, zero, capability: tuple[int, int] = (9, 0),
                  decode_steps: int | None = 2, pad_id: int = 0, eos_ids=(1,)) -> StepReport:
    """selfkd.train_step on `branch` ("dataset" or "on-policy"), then the checkpoint's tensors, on one
    simulated rank of `world`, for the training flags `cfg` (flags.Config) and thinker config `mcfg`.

    Sampling runs the prefill, and the model for the first `decode_steps` decode steps (None: all);
    the later ones are identical (static shapes: the whole preallocated cache under a mask, the same
    ops), so each is counted as a copy of the last one run and hands on its output, while the rest
    of generate (the draws, the checks for finished rows) runs for every token. Same launches, ops
    and FLOPs as running them all, and their memory is the steps' run (tests/test_simulate.py).
    At the released width a decode step is ~5,000 ops, seconds here: 511 would take most of an hour."""
    import selfkd
    from chat import Batch
    from lora import adapter_tensors, inject_lora

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = M.Thinker(mcfg)
            inject_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, ",".join(cfg.lora_target_modules),
                        freeze_vit=cfg.freeze_vit, freeze_aligner=cfg.freeze_aligner)
    finally:
        torch.set_default_dtype(default)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    params = [(p.numel(), p.requires_grad, p.element_size()) for p in model.parameters()]
    engine = SimulatedEngine(model, world, cfg.learning_rate, zero)

    B, C = cfg.per_device_train_batch_size, cfg.max_completion_length
    P = cfg.max_length - C
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 1000, (B, P), generator=g)
    batch = Batch(prompt, torch.ones(B, P, dtype=torch.long), prompt, torch.ones(B, P, dtype=torch.long),
                  torch.randint(2, 1000, (B, C), generator=g), torch.ones(B, C, dtype=torch.long))

    sim, memory = SimulatedGPU(), StepMemory()
    peaks = {name: {} for name in PHASES}

    @contextmanager
    def phase(name):
        with sim.phase(name), memory.peak_of(peaks[name]):
            yield

    def sample(prompt_ids, prompt_mask, media_inputs, media):
        """selfkd.sample_completions; its decode steps after the first `decode_steps` counted, not run."""
        runs = []

        def step(*args):
            cost = sim.costs["generation"]
            if decode_steps is None or len(runs) < decode_steps:
                before = cost.snapshot()
                out = model.decode_step(*args)
                runs.append((before, cost.snapshot(), out))
                return out
            before, after, out = runs[-1]  # the same step again: its ops, its output's shape
            cost.add(before, after, 1)
            return out

        with phase("generation"):
            return selfkd.sample_completions(engine, prompt_ids, prompt_mask, None, max_new_tokens=C,
                                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                             eos_ids=eos_ids, pad_id=pad_id, gather=cfg.gather_for_generation,
                                             media_inputs=media_inputs, media=media, step=step)

    def timed(fn, name_of):
        def wrapper(*args, **kwargs):
            with phase(name_of()):
                return fn(*args, **kwargs)
        return wrapper

    real = selfkd.completion_hidden, selfkd.chunked_jsd_loss_sum, engine.backward, engine.step
    selfkd.completion_hidden = timed(real[0], lambda: "student forward" if torch.is_grad_enabled() else
                                     "teacher forward")
    selfkd.chunked_jsd_loss_sum = timed(real[1], lambda: "loss")
    engine.backward, engine.step = timed(real[2], lambda: "backward"), timed(real[3], lambda: "optimizer step")
    memory.track(model, engine.optimizer, engine.master,
                 *(t for t in [engine.grad_partition, *engine.buckets] if t is not None))
    engine.track = memory.track_external
    try:
        with fake_group(world), cuda_choices(capability), HostData(), memory, sim:
            device_batch = selfkd.to_device(batch, "meta")
            selfkd.train_step(engine, [device_batch], branch, sample, cfg.beta, cfg.temperature, cfg.sft_alpha,
                              cfg.learning_rate)
            with phase("checkpoint save"):
                adapter_tensors(model)
            held_after = memory.now()
    finally:
        selfkd.completion_hidden, selfkd.chunked_jsd_loss_sum = real[0], real[1]
    return StepReport({k: v for k, v in sim.costs.items() if k in PHASES}, {k: v for k, v in peaks.items() if v},
                      held_after, params)


# ----------------------------------------------------------------------------------------------
# The report: memory beside the plan, launches, time


PLAN_PHASES = {"held all run": (), "forward + backward": ("student forward", "backward"), "loss": ("loss",),
               "generation": ("generation",), "checkpoint save": ("checkpoint save",)}
ROWS = ("weights", "optimizer state", "gradients", "activations, cache, buffers", "DeepSpeed's gathers (plan, not run)")


def plan_row(what: str) -> str:
    """The row of the comparison a memory plan item belongs to."""
    if what.startswith(("ZeRO-3 gathered", "ZeRO-3 kept", "  ...and DeepSpeed", "lm_head gathered",
                        "adapter gathered")):  # DeepSpeed's gathers: not executed here
        return ROWS[4]
    if "parameters" in what or "gathered" in what:  # the partitions, the whole model or lm_head gathered
        return ROWS[0]
    if "master" in what or "AdamW" in what:
        return ROWS[1]
    if what.startswith(("LoRA gradient", "gradient reduce bucket")):
        return ROWS[2]
    return ROWS[3]


def measured_rows(snapshot: dict, r: StepReport, zero, world: int, whole_model: bool) -> dict:
    """A MemTracker snapshot in the comparison's rows, the weights as a rank of `world` holds them under
    `zero` (memory_plan.Zero): whole under ZeRO-2; under ZeRO-3 its 1/world of each tensor, the small
    persistent ones whole, and (`whole_model`) the gathered thinker beside them while sampling."""
    weights = sum(n * b for n, _, b in r.params)
    if zero.stage == 3:
        held = sum((n if zero.persistent(n, t) else math.ceil(n / world)) * b for n, t, b in r.params)
        weights = held + (weights if whole_model else 0)
    return {ROWS[0]: weights, ROWS[1]: snapshot.get("Optstate", 0),
            ROWS[2]: snapshot.get("Gradient", 0) + snapshot.get("Other", 0),
            ROWS[3]: sum(snapshot.get(k, 0) for k in ("Activation", "Temp", "Buffer"))}


def memory_table(runs: dict, plan, zero, world: int, gather: bool) -> tuple[list[str], float]:
    """Per phase, the simulated rows beside the plan's (GiB); ZeRO-3's gathers inside the passes are
    DeepSpeed's and not executed, so the plan's figure stands in both columns. -> (lines, peak bytes)"""
    lines, peak = [f"  {'phase / what':<40}{'simulated':>10}{'plan':>8}{'diff':>8}"], (0.0, "")
    for phase in [plan.held, *plan.phases]:
        names = PLAN_PHASES.get(phase.name, ())
        snaps = ([r.held_after for r in runs.values()] if not names else
                 [r.memory[n] for r in runs.values() for n in names if n in r.memory])
        if not snaps:
            continue
        snap = max(snaps, key=lambda m: m["Total"])
        sim = measured_rows(snap, next(iter(runs.values())), zero, world, phase.name == "generation" and gather)
        want = dict.fromkeys(ROWS, 0.0)
        for item in plan.held.items + (phase.items if phase is not plan.held else []):
            if not item.on_host:
                want[plan_row(item.what)] += item.nbytes
        sim[ROWS[4]] = want[ROWS[4]]
        total, planned = sum(sim.values()), sum(want.values())
        lines.append(f"  {phase.name:<40}{total / GiB:>10.2f}{planned / GiB:>8.2f}{(total - planned) / planned:>+8.0%}")
        for row in ROWS:
            if sim[row] or want[row]:
                diff = f"{(sim[row] - want[row]) / want[row]:>+8.0%}" if want[row] else f"{'':>8}"
                lines.append(f"    {row:<38}{sim[row] / GiB:>10.2f}{want[row] / GiB:>8.2f}{diff}")
        peak = max(peak, (total, phase.name))
    return lines, peak


def report(cfg, card: str, world: int, persistent_numel: int = 0) -> str:
    """The step of the flags on `world` simulated GPUs of kind `card`, and on one (ZeRO-2): memory per
    GPU by phase beside the memory plan, kernel launches and estimated time per phase, and per card
    in GPUS the step times, tokens/s and MFU."""
    import memory_plan
    from selfkd import deepspeed_config

    started = time.time()
    mcfg = M.ThinkerConfig.from_pretrained(cfg.model, towers=False)
    gpu, B, T, C = GPUS[card], cfg.per_device_train_batch_size, cfg.max_length, cfg.max_completion_length
    branches = ["dataset"] + (["on-policy"] if cfg.lmbda > 0 or cfg.seq_kd else [])
    launches = {world} | {1}
    out, summary = [], []
    for n in sorted(launches, reverse=True):
        ds = deepspeed_config(cfg, torch.bfloat16, world_size=n)
        zero = memory_plan.Zero.from_config(ds, 2, persistent_numel)
        plan = memory_plan.plan_for(cfg, ds, n, towers=False, persistent_numel=persistent_numel)
        runs = {b: simulate_step(cfg, mcfg, n, b, zero, gpu.capability) for b in branches}
        lines, (peak, where) = memory_table(runs, plan, zero, n, cfg.gather_for_generation)
        out += ["", f"memory per GPU, GiB, ZeRO-{zero.stage} on {n} GPU(s): torch's MemTracker at each phase's peak "
                f"in the executed step (weights as ZeRO holds them) beside the plan (--estimate_memory)", *lines,
                f"  simulated peak per GPU: {peak / GiB:.1f} GiB in {where}; plan: {plan.peak_line()}"]
        base = sum(k * b for k, t, b in runs["dataset"].params if not t)
        for key, card_gpu in GPUS.items():
            times = {b: step_seconds(r, key, cfg, zero.stage, n, base) for b, r in runs.items()}
            flops = {b: sum(c.flops for c in r.costs.values()) for b, r in runs.items()}
            summary.append(f"  {card_gpu.name:<16} ZeRO-{zero.stage} x{n:<3}{peak / GiB:>7.1f} GiB "
                           f"{'fits' if peak / GiB <= card_gpu.memory_gib else 'DOES NOT FIT':<13}"
                           + "".join(f"{b}: {t:.2f} s, {B * T * n / t:,.0f} tok/s, MFU {flops[b] / t / card_gpu.bf16_flops:.0%};  "
                                     for b, t in times.items()))
        if n == world:
            out += phase_table(runs, card, cfg, zero.stage, n, base)
    head = (f"simulated: the training step of these flags executed on meta tensors ({mcfg.num_hidden_layers} layers, "
            f"{mcfg.num_experts} experts, LoRA r{cfg.lora_rank} on {' '.join(cfg.lora_target_modules)}, bf16; "
            f"micro-batch {B} x {T} tokens, completion {C}), on {world} and on 1 simulated GPU(s), text rows")
    if memory_plan.dataset_has_media(cfg.dataset):
        head += "\nnote: the dataset has media rows; the towers and their activations are not simulated"
    return "\n".join([head, *out, "", "per card (roofline + launches; see the phase table):", *summary,
                      f"(simulated in {time.time() - started:.0f} s)"])


def gather_seconds(gpu: GPU, stage: int, world: int, base: int, sampling_gathers: int) -> dict:
    """ZeRO-3's all-gathers of the base weights per phase, at NVLink speed: each rank receives the
    (world - 1) / world it lacks. The passes gather every layer (the teacher's and the student's
    forward, and the backward: the recomputation and the layer's own gradients, DeepSpeed keeping
    the weights between them only for the last layers); sampling `sampling_gathers` times: once
    (--gather_for_generation) or at every decode step."""
    if stage != 3 or world == 1:
        return {}
    once = base * (world - 1) / world / gpu.nvlink
    return {"generation": once * sampling_gathers, "teacher forward": once, "student forward": once, "backward": once}


def sampling_gathers(cfg) -> int:
    return 1 if cfg.gather_for_generation else cfg.max_completion_length


def decode_graphs(cfg, stage: int) -> bool:
    """Whether sampling replays its decode step as CUDA graphs: --compile_decode (auto: on a GPU),
    except under ZeRO-3 without --gather_for_generation, where DeepSpeed's per-module gathers run
    eagerly (selfkd.sample_completions)."""
    return cfg.compile_decode != "false" and (stage != 3 or cfg.gather_for_generation)


def step_seconds(r: StepReport, card: str, cfg, stage: int, world: int, base: int) -> float:
    """A step's predicted seconds: per phase the GPU's roofline or the host's launches when longer
    (eager), except sampling's decode steps under --compile_decode (CUDA graphs: the GPU's time);
    the passes' gathers overlap their compute (DeepSpeed prefetches), sampling's gather precedes it."""
    comm = gather_seconds(GPUS[card], stage, world, base, sampling_gathers(cfg))
    total = 0.0
    for name, c in r.costs.items():
        compute = c.seconds[card]
        if not (name == "generation" and decode_graphs(cfg, stage)):
            compute = max(compute, c.launches * LAUNCH_SECONDS)
        gather = comm.get(name, 0.0)
        total += compute + gather if name == "generation" else max(compute, gather)
    return total


def phase_table(runs: dict, card: str, cfg, stage: int, world: int, base: int) -> list[str]:
    gpu = GPUS[card]
    lines = ["", f"time per phase on {gpu.name} (ZeRO-{stage} x{world}): roofline at {COMPUTE_EFFICIENCY:.0%} of "
             f"{gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16 and {gpu.hbm / 1e12:.2f} TB/s; eager launches at "
             f"{LAUNCH_SECONDS * 1e6:.0f} us each; ZeRO-3 gathers at {gpu.nvlink / 1e9:.0f} GB/s NVLink",
             f"  {'branch / phase':<30}{'launches':>11}{'TFLOP':>8}{'GPU s':>8}{'launch s':>9}{'gather s':>9}  bound"]
    for b, r in runs.items():
        comm = gather_seconds(gpu, stage, world, base, sampling_gathers(cfg))
        for name, c in r.costs.items():
            launch, compute, gather = c.launches * LAUNCH_SECONDS, c.seconds[card], comm.get(name, 0.0)
            graphs = name == "generation" and decode_graphs(cfg, stage)
            bound = max(("GPU", compute), ("launches", 0 if graphs else launch), ("NVLink", gather), key=lambda x: x[1])
            lines.append(f"  {b + ' / ' + name:<30}{c.launches:>11,}{c.flops / 1e12:>8.1f}{compute:>8.3f}{launch:>9.3f}"
                         f"{gather:>9.3f}  {bound[0]}" + ("  (decode steps as CUDA graphs: launches do not bind)"
                                                          if graphs else ""))
        top = sorted(((s, op) for (k, op), s in r.costs["generation"].op_seconds.items() if k == card),
                     reverse=True)[:5] if "generation" in r.costs else []
        if top:
            lines.append("    sampling's GPU time by op: " + ", ".join(f"{op} {s:.2f} s" for s, op in top))
        lines.append(f"  {b + ' step':<30} {step_seconds(r, card, cfg, stage, world, base):.2f} s")
    return lines
