"""Test worker, one per rank under `torch.distributed.run --nproc_per_node 2`: measures what a real
selfkd training step holds, for tests/test_memory_plan.py to hold memory_plan's estimate against.

    python tests/memory_worker.py MODEL_DIR OUT_JSON DEEPSPEED [DEEPSPEED ...]

For each --deepspeed value (a preset, or a JSON file: then without selfkd's persistent small tensors,
so that ZeRO-3 gathers every module's parameters per use) the student is built by selfkd.build_student,
wrapped by deepspeed.initialize and trained for two steps of selfkd.train_step on synthetic batches
of exactly the plan's design point (batch x max_length tokens, no padding). Measured, in bytes of
live tensors (each storage once, found through the garbage collector; not RSS):

    base         the frozen parameters' storage: this rank's ZeRO-3 partitions, or the replica
    held_other   every other live tensor between steps: LoRA weights, fp32 master, AdamW moments,
                 gradient partitions, DeepSpeed's buffers
    gathered     ZeRO-3: the most parameter elements gathered at once in the backward (where the
                 step peaks), seen at every module's forward of the checkpointed layers'
                 recomputation (DeepSpeed's own record, ds_status AVAILABLE), times the element size
    step_peak    above what is held between steps, the most the second step had allocated at
                 once (the CPU allocator's running total under torch.profiler's memory profiling,
                 without gloo's temporary copies inside a collective)
The results of rank 0 go to OUT_JSON as {deepspeed: {...}}.
"""
import bisect
import gc
import json
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import loss  # noqa: E402
from chat import Batch  # noqa: E402
from lora import lora_parameters  # noqa: E402
import selfkd  # noqa: E402
from selfkd import Config, build_student, check_weights, deepspeed_config, init_distributed, train_step  # noqa: E402

PERSISTENT = selfkd.ZERO3_PERSISTENT_NUMEL

FLAGS = dict(torch_dtype="float32", lora_rank=8, lora_alpha=16, lora_dropout=0.05, max_length=96,
             max_completion_length=32, per_device_train_batch_size=2, lmbda=0.0, gradient_checkpointing=True)


def config(model_dir: str, deepspeed: str) -> Config:
    return Config(model=model_dir, dataset=["(synthetic)"], deepspeed=deepspeed, **FLAGS)


def live_tensor_bytes() -> dict[int, int]:
    """storage address -> bytes, of every tensor Python can reach (parameters, optimizer state,
    DeepSpeed's flat buffers and partitions)."""
    gc.collect()
    out = {}
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - tensors without storage (sparse, functional wrappers)
            continue
        if storage.nbytes():
            out[storage.data_ptr()] = storage.nbytes()
    return out


def base_storages(model) -> dict[int, int]:
    """The frozen parameters' storages: their ZeRO-3 partitions (and the whole tensor of those kept
    persistent), or the tensors themselves."""
    out = {}
    for _, p in model.named_parameters():
        if p.requires_grad:
            continue
        tensors = [p.ds_tensor] + ([p.data] if getattr(p, "ds_persist", False) else []) if hasattr(p, "ds_tensor") \
            else [p.data]
        for t in tensors:
            if t.numel():
                out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def batch(cfg: Config, vocab: int, seed: int) -> Batch:
    """Full rows: a prompt of max_length - max_completion_length tokens and a whole completion."""
    g = torch.Generator().manual_seed(seed)
    B, C = cfg.per_device_train_batch_size, cfg.max_completion_length
    P = cfg.max_length - C
    ids = lambda n: torch.randint(0, vocab, (B, n), generator=g)  # noqa: E731
    ones = lambda n: torch.ones(B, n, dtype=torch.long)  # noqa: E731
    return Batch(ids(P), ones(P), ids(P), ones(P), ids(C), ones(C))


def allocated_peak(prof) -> int:
    """The most bytes allocated at once in the profiled region, above what was allocated when it
    began: the running sum of the CPU allocator's allocations and frees on the thread that ran
    the step. Left out: gloo's temporary copies, made inside a collective or on gloo's own threads
    (NCCL on a GPU writes into the output directly)."""
    events = prof.profiler.kineto_results.events()
    main = Counter(e.start_thread_id() for e in events if e.name() != "[memory]").most_common(1)[0][0]
    inside = sorted((e.start_ns(), e.end_ns()) for e in events
                    if e.name().startswith(("c10d::", "gloo:", "record_param_comms")))
    starts = [a for a, _ in inside]

    def in_collective(t: int) -> bool:
        i = bisect.bisect_right(starts, t)
        return any(a <= t <= b for a, b in inside[max(0, i - 8):i])

    running = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if e.device_type() == torch.autograd.DeviceType.CPU and e.start_thread_id() == main \
                and not in_collective(e.start_ns()):
            running += e.nbytes()
            peak = max(peak, running)
    return peak


def measure(model_dir: str, deepspeed: str) -> dict:
    import deepspeed as ds_lib

    selfkd.ZERO3_PERSISTENT_NUMEL = 0 if deepspeed.endswith(".json") else PERSISTENT
    loss._CPU_SCRATCH.clear()  # the loss's CPU buffers: allocated again by this stage's first step
    before = live_tensor_bytes()  # an earlier stage's engine may live on: count only what is new
    cfg = config(model_dir, deepspeed)
    dtype = torch.float32
    ds = deepspeed_config(cfg, dtype, world_size=torch.distributed.get_world_size())
    model, _, sums = build_student(cfg, ds, dtype, torch.device("cpu"), log=lambda msg: None)
    optimizer = torch.optim.AdamW([p for _, p in lora_parameters(model)], lr=1e-3)
    engine, _, _, _ = ds_lib.initialize(model=model, optimizer=optimizer, config=ds)
    check_weights(engine, sums, dtype)
    engine.train()
    params = [p for p in model.parameters() if hasattr(p, "ds_status") and not p.ds_persist]
    gathered = [0]

    def record(*_):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if torch._C._current_graph_task_id() == -1:  # not inside the backward
            return
        now = sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE)
        gathered[0] = max(gathered[0], now)

    if params:
        for module in model.modules():  # after DeepSpeed's hooks: runs once a module is gathered
            module.register_forward_pre_hook(record)
    vocab = model.cfg.vocab_size
    rank = torch.distributed.get_rank()
    train_step(engine, [batch(cfg, vocab, rank)], "dataset", None, 0.5, 2.0, 0.0, 1e-3)
    live = {ptr: n for ptr, n in live_tensor_bytes().items() if ptr not in before}
    base = base_storages(model)
    held = sum(live.values())
    gathered[0] = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(engine, [batch(cfg, vocab, 10 + rank)], "dataset", None, 0.5, 2.0, 0.0, 1e-3)
    return {"base": sum(base.values()), "held_other": held - sum(base.values()),
            "gathered": gathered[0] * 4,  # float32
            "step_peak": allocated_peak(prof), "world": torch.distributed.get_world_size()}


def main(model_dir: str, out: str, *stages: str):
    cfg = config(model_dir, stages[0])
    init_distributed(cfg)
    results = {stage: measure(model_dir, stage) for stage in stages}
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
