"""Test worker for tests/test_distributed.py, one per rank under `torch.distributed.run`:

    python -m torch.distributed.run --nproc_per_node N tests/dist_worker.py MODEL_DIR OUT_FILE RUNS

RUNS is a comma list of run names (RUNS below). Each run builds the student the way the trainer
does (selfkd.build_student, deepspeed_config, deepspeed.initialize) and takes optimizer steps with
selfkd.train_step itself, on the same rows whatever the number of processes: micro_batches gives
step s the rows of the same seeded permutation, split over ranks and micro-batches. Recorded per
step (rank 0 writes OUT_FILE with torch.save): the loss sums, the full LoRA gradients at the
optimizer step (before clipping) and the full fp32 LoRA weights after it.

The LoRA B matrices start random (the same on every rank), so that every LoRA tensor gets a
gradient from the first step on; dropout is 0, so the runs are deterministic. Step 2 of the
two-process runs is on-policy: each rank samples with a generator seeded by its rank. AdamW's
epsilon is 1e-3, so that the update is a smooth function of the gradient: with 1e-8 a component
whose gradient is ~1e-8 moves by a good part of the learning rate, and fp32 rounding in that
gradient would show in the weights. ZeRO-3 runs also record whether DeepSpeed's fetch trace was
complete after each step (selfkd.zero3_new_step: a repeating trace lets it prefetch).
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from chat import encode_examples, load_tokenizer  # noqa: E402
from data import SAMPLE_DATASET, load_dataset_specs  # noqa: E402
from lora import lora_parameters  # noqa: E402
from selfkd import (Config, build_student, check_weights, deepspeed_config, init_distributed,  # noqa: E402
                    load_checkpoint, micro_batches, sample_completions, save_checkpoint, to_device, train_step)

SEED, LR, EPS, BETA, TEMPERATURE = 3, 1e-2, 1e-3, 0.5, 2.0
# name -> (--deepspeed, per-device batch, gradient accumulation, branches of steps 0, 1, ...)
RUNS = {
    "zero2_b4": ("zero2", 4, 1, ["dataset", "dataset"]),
    "zero2_b2_ga2": ("zero2", 2, 2, ["dataset", "dataset"]),
    "zero3_b4": ("zero3", 4, 1, ["dataset", "dataset"]),  # real ZeRO-3 at one process too (no world_size)
    "zero2_b2": ("zero2", 2, 1, ["dataset", "dataset", "on-policy"]),
    "zero3_b2": ("zero3", 2, 1, ["dataset", "dataset", "on-policy"]),
    "offload_b2": ("zero3_offload", 2, 1, ["dataset", "dataset", "on-policy"]),
    # on the omni model (MODEL_DIR with towers), rows with images, audio and video: branches alternate
    "zero3_media_b2": ("zero3", 2, 1, ["dataset", "on-policy", "dataset", "on-policy"]),
}
MEDIA_RUNS = {"zero3_media_b2"}
RESUME_AFTER = 1  # runs named "<run>+resume": save after this many steps, then a fresh engine resumes


class GradRecorder:
    """The DeepSpeed engine, with the full LoRA gradients read at the optimizer step (every rank
    calls it: under ZeRO the gradients are gathered collectively)."""

    def __init__(self, engine):
        self.engine, self.grads = engine, None

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def step(self):
        from deepspeed.utils import safe_get_full_grad

        if self.engine.is_gradient_accumulation_boundary():
            self.grads = {n: safe_get_full_grad(p).detach().float().cpu().clone()
                          for n, p in lora_parameters(self.engine.module)}
        self.engine.step()


def lora_weights(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in lora_parameters(engine.module)}


def build(model_dir: str, preset: str, batch: int, accumulation: int, towers: bool = False):
    import deepspeed

    cfg = Config(model=model_dir, torch_dtype="float32", deepspeed=preset, lora_rank=4, lora_alpha=8,
                 lora_dropout=0.0, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                 learning_rate=LR, adam_epsilon=EPS, seed=SEED)
    ds = deepspeed_config(cfg, torch.float32)
    device = init_distributed(cfg)
    model, _, sums = build_student(cfg, ds, torch.float32, device, log=lambda msg: None, towers=towers)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in lora_parameters(model):  # B = 0 would leave A without a gradient at first
            if name.endswith(".B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    optimizer = torch.optim.AdamW([p for _, p in lora_parameters(model)], lr=cfg.learning_rate,  # as train()
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  weight_decay=cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    check_weights(engine, sums, torch.float32)  # float32 partitions equal to the checkpoint, or stop here
    return GradRecorder(engine), device


def take_steps(engine, device, tok, encoded, batch, accumulation, branches, first=0):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rows = []
    for step in range(first, len(branches)):
        sampler = torch.Generator().manual_seed(1000 * step + rank)

        def sample(ids, mask, media_inputs, media):
            return sample_completions(engine, ids, mask, sampler, max_new_tokens=8, temperature=TEMPERATURE,
                                      top_k=0, top_p=1.0, eos_ids=tok.eos_ids, pad_id=tok.pad_id, gather=True,
                                      media_inputs=media_inputs, media=media)

        batches = [to_device(b, device) for b in micro_batches(encoded, step, SEED, batch, accumulation, rank,
                                                               world, tok.pad_id)]
        result = train_step(engine, batches, branches[step], sample, BETA, TEMPERATURE, 0.0, LR)
        offload = getattr(engine.optimizer, "parameter_offload", None)
        rows.append({"step": step, "jsd_sum": result["jsd_sum"], "tokens": result["tokens"],
                     "grad_norm": result["grad_norm"], "grads": engine.grads, "weights": lora_weights(engine),
                     "complete_trace": offload.get_param_coordinator().is_complete_trace() if offload else None})
    return rows


def main(model_dir: str, out_file: str, runs: str):
    tok = load_tokenizer(model_dir)
    media = all(name in MEDIA_RUNS for name in runs.split(","))
    if media:
        dataset, kw = os.path.join(os.path.dirname(str(SAMPLE_DATASET)), "sample_omni.jsonl"), {}
    else:
        dataset, kw = str(SAMPLE_DATASET), {"teacher_sees_reference": True}
    examples, _, _ = load_dataset_specs([dataset], seed=0, split_ratio=0.0, **kw)
    if media:  # the rows with audio only: every step calls the same towers (a step's tower calls follow
        # the modalities present, which would change the traced passes from step to step by themselves)
        examples = [e for e in examples if {m.kind for m in e.media.values()} == {"audio"}]
    encoded, _ = encode_examples(tok, examples[:24], max_length=1024 if media else 128, max_completion_length=8)
    results = {}
    for name in runs.split(","):
        run, resume = name.removesuffix("+resume"), name.endswith("+resume")
        preset, batch, accumulation, branches = RUNS[run]
        engine, device = build(model_dir, preset, batch, accumulation, towers=media)
        rows = take_steps(engine, device, tok, encoded, batch, accumulation, branches[:RESUME_AFTER] if resume
                          else branches)
        if resume:  # save (real checkpoint files), then a fresh engine loads them and takes the rest
            with tempfile.TemporaryDirectory() as tmp:
                box = [tmp]
                torch.distributed.broadcast_object_list(box, src=0)  # rank 0's directory on every rank
                path = save_checkpoint(engine.engine, box[0], RESUME_AFTER, {"step": RESUME_AFTER}, False, None,
                                       log=lambda msg: None)
                engine, device = build(model_dir, preset, batch, accumulation, towers=media)
                load_checkpoint(engine.engine, path, log=lambda msg: None)
                torch.distributed.barrier()  # every rank has read it before rank 0 removes it
            rows += take_steps(engine, device, tok, encoded, batch, accumulation, branches, first=RESUME_AFTER)
        results[name] = rows
    if torch.distributed.get_rank() == 0:
        torch.save(results, out_file)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
