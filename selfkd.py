"""selfkd: GKD LoRA self-distillation for the Qwen3-Omni thinker on raw DeepSpeed ZeRO-3. The trainer.

The student is the base model + LoRA (trainable); the teacher is the SAME base model with the
LoRA adapters switched off (frozen, no second copy). Each step, with probability `lmbda`, the
student samples the completion (on-policy); otherwise the dataset completion is used. The loss
is the generalized Jensen-Shannon divergence between teacher and student next-token
distributions on the completion tokens.

The file reads top to bottom:
  1. sampling            sample_completions (KV-cache decoding, ranks step in lockstep, ZeRO-3 gathered once)
  2. DeepSpeed setup     deepspeed_config, init_distributed, build_student (loads into ZeRO-3 partitions),
                         check_weights (what runs, read from the live tensors)
  3. the training step   step_branch, micro_batches, gkd_loss_sums, train_step, evaluate
  4. the loop            train
`python selfkd.py ...` hands the command line to commands.main. Around the trainer: flags.py (the
flags), plan.py (the checks before any rank starts), checkpoints.py, runlog.py (what the user
reads), commands.py (launch, check, evaluate, generate, export, curve); the loss is in loss.py,
decoding in generate.py, the model in model_qwen3omni.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import fields
from datetime import timedelta

import torch

import memory_plan
from checkpoints import load_checkpoint, prepare_output_dir, save_checkpoint
from chat import Batch, collate, join_prompt_completion, reads_the_media
from flags import DEEPSPEED_PRESETS, Config, ConfigError, TrainingAborted, args_json
from loss import chunked_jsd_loss_sum, sft_loss_sum
from lora import inject_lora, lora_disabled, lora_parameters
from generate import CompiledStep, generate
from model_qwen3omni import SparseMoE, Thinker, ThinkerConfig, resolve_dtype
from weights import checksum, held_here, load_weights, part_of
from plan import data_report, fixed_point_warning, plan_run
from runlog import (ARGS_FILE, COMPLETIONS_FILE, LOG, LOG_FILE, RUN, MetricsSink, Stopped, _Signals, first_eval,
                    peak_memory_gib, progress_line, run_summary, write_curve_quietly)


# ----------------------------------------------------------------------------------------------
# 1. Sampling
# ----------------------------------------------------------------------------------------------


def sample_completions(engine, prompt_ids, prompt_mask, generator, *, max_new_tokens: int, temperature: float,
                       top_k: int, top_p: float, eos_ids, pad_id: int, gather: bool, media_inputs=None, media=None,
                       step=None):
    """Completions [B, C] and their mask (1 up to and including the first eos) sampled from the
    model as it is now (LoRA on: the student; inside lora_disabled: the teacher). `engine` is the
    DeepSpeed engine or a plain Thinker.

    Under ZeRO-3 every rank must make the same number of forward calls, so ranks agree on when
    all of them are done. With `gather` the weights are gathered once for the whole generation
    instead of at every decode step. `media_inputs`: the prompts' media (MediaInputs) or None;
    `media`: their tower outputs when already computed (the towers then do not run again).
    `step`: the decode step to run (a generate.CompiledStep), except under ZeRO-3 without `gather`,
    where DeepSpeed's hooks gather each module as it runs, which no compiled graph holds."""
    model = getattr(engine, "module", engine)
    if not gather and zero3_offload(engine) is not None:
        step = None
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    def all_done(local_done: bool) -> bool:
        if not distributed:
            return local_done
        flag = torch.tensor([0.0 if local_done else 1.0], device=prompt_ids.device)
        torch.distributed.all_reduce(flag)
        return flag.item() == 0

    # a completion never carries a media placeholder: sampled, one would meet no tower output in
    # the loss's forward (the ids exist in the vocabulary; a random or drifting model can pick them)
    placeholders = [i for i in (model.cfg.audio_token_id, model.cfg.image_token_id, model.cfg.video_token_id)
                    if i < model.cfg.vocab_size]
    was_training = model.training
    model.eval()  # no LoRA dropout while sampling
    try:
        with gathered_for_generation(engine, gather):
            return generate(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature=temperature,
                            top_k=top_k, top_p=top_p, generator=generator, banned_ids=placeholders,
                            all_done=all_done, media_inputs=media_inputs, media=media, step=step)
    finally:
        model.train(was_training)


def compiled_decode(model, choice: str, device, log) -> CompiledStep | None:
    """--compile_decode: the compiled decode step sampling runs, or None (eager). auto: on a GPU."""
    if choice == "true" or (choice == "auto" and torch.device(device).type == "cuda"):
        return CompiledStep(model, log)
    return None


def zero3_offload(engine):
    """ZeRO-3's parameter coordinator (its per-module gather hooks), or None: other stages, a plain model."""
    return getattr(getattr(engine, "optimizer", None), "parameter_offload", None)


@contextmanager
def gathered_for_generation(engine, enabled: bool):
    """ZeRO-3: gather every weight once and detach DeepSpeed's per-module hooks for the
    duration (as TRL's ds3_gather_for_generation does), so that a compiled decode step runs on
    the gathered weights; other stages: nothing to do.

    Putting the hooks back would make DeepSpeed drop its record of the training passes' fetch
    order (see zero3_new_step), so the coordinator is kept aside meanwhile and the modules get
    their ids back: the record stays right, and the passes after sampling still prefetch."""
    offload = zero3_offload(engine)
    if not enabled or offload is None:
        yield
        return
    import deepspeed

    params = list(engine.module.parameters())
    # the leaf modules' gradient-reduction hooks (backward only; sampling runs without gradients)
    # aside too: torch.compile refuses a module that has backward hooks
    leaves = [(m, m._backward_hooks) for m in engine.module.modules() if m._backward_hooks]
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        for m, _ in leaves:
            m._backward_hooks = OrderedDict()
        try:
            yield
        finally:
            for m, hooks in leaves:
                m._backward_hooks = hooks
            coordinator, offload.param_coordinator = offload.param_coordinator, _UntracedCoordinator()
            try:  # the modules' ids as before (the record refers to them)
                offload._register_deepspeed_module(offload.module, count=[offload.module.ds_id])
            finally:
                offload.param_coordinator = coordinator


class _UntracedCoordinator:
    """What DeepSpeed's hook registration asks of the parameter coordinator: whether it holds a
    trace to invalidate (no)."""

    def is_invalid_trace(self) -> bool:
        return True


def zero3_new_step(engine):
    """ZeRO-3: tell DeepSpeed that the passes of a new optimizer step (or of an evaluation) start here.

    DeepSpeed records the order in which modules fetch their parameters over one "step", and when
    the next step repeats it (a complete trace) it prefetches the next modules' parameters while
    the current one computes, keeps a parameter that is used again soon (the recomputation of a
    checkpointed layer, then its backward) and keeps the persistent ones. By default a step starts
    at every top-level forward, and selfkd's step makes two different ones (the teacher pass with
    no backward, the student pass with it), so the trace never repeats: every module then gathers
    its parameters on demand, one collective each, and releases them at once (at real width the
    same 1.2 GB expert stack twice in a row: recomputation, then backward). Here a step is the
    whole optimizer step (teacher and student passes of every micro-batch, their backward), which
    repeats. Other stages and engines: nothing to do."""
    offload = zero3_offload(engine)
    if offload is None:
        return
    if not getattr(offload, "selfkd_steps", False):  # once: drop the reset at every top-level forward
        offload.fwd_pre_hook.remove()
        offload.selfkd_steps = True
    offload.get_param_coordinator().reset_step()


# ----------------------------------------------------------------------------------------------
# 2. DeepSpeed setup
# ----------------------------------------------------------------------------------------------


def deepspeed_config(cfg: Config, dtype: torch.dtype, world_size: int | None = None) -> dict:
    """Built-in configs for the ms-swift preset names, or the user's JSON file. The batch and
    clipping fields always come from the flags, so the two cannot disagree.

    With `world_size` 1 (one process) the zero3 preset becomes ZeRO-2: one rank has nothing to
    partition, and ZeRO-3 would still gather and release every weight at every call (train()
    says so in the log). zero3_offload stays ZeRO-3 (its point is the weights in CPU memory) and
    a JSON file is taken as written."""
    if cfg.deepspeed in DEEPSPEED_PRESETS:
        stage = 2 if cfg.deepspeed == "zero2" or (cfg.deepspeed == "zero3" and world_size == 1) else 3
        zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
        if stage == 3:
            # No persistence threshold: DeepSpeed 0.19.8 would also make the small LoRA tensors
            # persistent and re-gather them, one collective each, after every optimizer step;
            # build_student marks the small frozen ones persistent instead. Prefetch (which needs
            # a complete trace, see zero3_new_step) reaches about one module ahead; a parameter
            # used again within 1e9 elements of fetches stays gathered.
            zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=1e9,
                        stage3_prefetch_bucket_size=5e7, stage3_max_reuse_distance=1e9,
                        stage3_gather_16bit_weights_on_model_save=False)
        ds = {"zero_optimization": zero}
        if cfg.deepspeed == "zero3_offload":
            zero.update(offload_param={"device": "cpu", "pin_memory": True},
                        offload_optimizer={"device": "cpu", "pin_memory": True})
            ds["zero_force_ds_cpu_optimizer"] = False  # our AdamW on the CPU partitions
    else:
        try:
            with open(cfg.deepspeed) as f:
                ds = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"--deepspeed {cfg.deepspeed!r}: not a preset ({', '.join(DEEPSPEED_PRESETS)}) "
                              f"and not a readable JSON file: {err}") from err
    ds.update(train_micro_batch_size_per_gpu=cfg.per_device_train_batch_size,
              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
              gradient_clipping=cfg.max_grad_norm, steps_per_print=10**9, wall_clock_breakdown=False)
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds["fp16"] = {"enabled": False}
    return ds


def init_distributed(cfg: Config):
    """One process (plain `python selfkd.py`), torchrun or the deepspeed launcher: all end up in
    one process group. CPU-only machines use gloo."""
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:  # a lone process: torch's default port 29500, offset by the
        # pid so that two single-process runs on one machine (e.g. a test suite's) do not collide
        os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        # DeepSpeed JIT-compiles its shared-memory all-reduce at start wherever a C++ compiler exists
        # (~30 s on the first start of every new install; nothing without a compiler), for its
        # inference_all_reduce alone, which selfkd never calls: off, every machine starts alike.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.ddp_timeout))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


# Frozen tensors up to this many elements stay gathered on every rank under ZeRO-3 (~13M elements,
# 26 MB in bf16, for the 30B thinker: its 48 routers of 128 x 2048 and the norms).
ZERO3_PERSISTENT_NUMEL = 1 << 19


def build_student(cfg: Config, ds: dict, dtype, device, log, towers: bool = False):
    """The thinker built partitioned (ZeRO-3) or whole, the checkpoint streamed into it, then
    LoRA added. towers=True (the data has media rows): with its audio and vision towers, frozen
    unless --freeze_vit / --freeze_aligner false; without, the language model alone (a text-only
    run's memory). Returns (model, LoRA summary, checksums): per base parameter, the checksum of
    what this rank must hold of it (its slice of the checkpoint tensor, in `dtype`) for check_weights."""
    import deepspeed

    mcfg = ThinkerConfig.from_pretrained(cfg.model, towers=towers)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        # No `dtype=`: DeepSpeed 0.19 reads it as `(dtype or fp16) if the accelerator has fp16 else bf16`,
        # so on a CPU without oneDNN fp16 an asked float32 became bfloat16 (docs/deepspeed-dtype-bug.md).
        # Without it, zero.Init takes the config's bf16 block (deepspeed_config): bfloat16 if enabled, else float32.
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = Thinker(mcfg)
    else:
        with torch.device("meta"):
            model = Thinker(mcfg).to(dtype)
        model.to_empty(device=device)
    names, sums = {p: n for n, p in model.named_parameters()}, {}

    def assign(param, value):  # this rank's part of a checkpoint tensor, as asked: cast, copied, summed
        here = held_here(param)
        mine = part_of(param, value).to(device=here.device, dtype=dtype)
        here.copy_(mine)
        sums[names[param]] = checksum(mine)

    load_weights(model, cfg.model, assign=assign)
    if stage == 3:  # the experts a rank's tokens reach differ between ranks: gather the MoE block as a unit
        deepspeed.utils.set_z3_leaf_modules(model, [SparseMoE])
    summary = inject_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                          ",".join(cfg.lora_target_modules), seed=cfg.seed, freeze_vit=cfg.freeze_vit,
                          freeze_aligner=cfg.freeze_aligner)
    for _, p in lora_parameters(model):
        p.data = p.data.to(device=device, dtype=dtype)
    if stage == 3:  # gathered once and kept, instead of at every call: the norms, routers and biases
        for p in model.parameters():
            if hasattr(p, "ds_id") and not p.requires_grad and p.ds_numel <= ZERO3_PERSISTENT_NUMEL:
                p.ds_persist = True
    model.gradient_checkpointing = cfg.gradient_checkpointing
    log(f"model: {cfg.model} ({mcfg.num_hidden_layers} layers, {mcfg.num_experts} experts, "
        f"vocab {mcfg.vocab_size}{', audio and vision towers' if towers else ''}), ZeRO stage {stage}, "
        f"dtype {dtype_name(dtype)}")
    return model, summary, sums


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_weights(engine, sums: dict, dtype) -> str:
    """What runs, read from the live tensors on every rank after deepspeed.initialize, against what
    was asked: every base tensor's partition (ZeRO-3) or copy in `dtype` and equal to its checkpoint
    slice (build_student's checksums), the LoRA weights in `dtype`, the optimizer's master copy in
    float32. A mismatch on any rank stops every rank with one line naming the tensor; otherwise
    returns the start line saying what runs."""
    model, world = engine.module, torch.distributed.get_world_size()
    zero3 = any(hasattr(p, "ds_tensor") for p in model.parameters())
    held, asked = ("partition", f"in {world} ZeRO-3 partitions") if zero3 else ("copy", "a whole copy per rank")
    lora = dict(lora_parameters(model))
    problems = []
    for name, p in model.named_parameters():
        mine = held_here(p)
        if mine.dtype != dtype:
            problems.append(f"{name} is {dtype_name(mine.dtype)}, asked {dtype_name(dtype)}")
        elif name not in lora and checksum(mine) != sums.get(name):
            problems.append(f"{name}: this rank's {held} differs from its slice of the checkpoint (checksum)")
    zero = engine.optimizer  # its fp32 master partitions: ZeRO-3's flat ones, ZeRO-1/2's
    masters = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups",
                                                                             None) or []
    problems += [f"the optimizer's master copy is {dtype_name(m.dtype)}, expected float32"
                 for m in masters if m.dtype != torch.float32][:1]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, problems)
    found = [f"rank {r}: {p}" for r, theirs in enumerate(everyone) for p in theirs]
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise TrainingAborted(f"the model as built is not what was asked: {found[0]}{more}")
    master = dtype_name(masters[0].dtype) if masters else "not checked (no ZeRO-1/2/3 partitions)"
    return (f"runs: base {dtype_name(dtype)} {asked}, {len(sums)} tensors equal to the checkpoint on every rank; "
            f"LoRA {dtype_name(dtype)}; optimizer master {master}")


# ----------------------------------------------------------------------------------------------
# 3. The training step
# ----------------------------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, schedule: str) -> float:
    """Linear warmup over warmup_ratio of the steps, then cosine / linear decay to 0, or constant."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak * (1 - progress)
    return peak


def is_on_policy(step: int, seed: int, lmbda: float) -> bool:
    """The same draw on every rank (seeded by seed + global step, as ms-swift does)."""
    return random.Random(seed + step).random() < lmbda


def step_branch(step: int, seed: int, lmbda: float, seq_kd: bool) -> str:
    """Where step `step` takes its completions from: the student samples ("on-policy", with
    probability lmbda), else the teacher samples ("teacher-sampled", --seq_kd) or the dataset."""
    if is_on_policy(step, seed, lmbda):
        return "on-policy"
    return "teacher-sampled" if seq_kd else "dataset"


def micro_batches(encoded: list, step: int, seed: int, batch_size: int, accumulation: int, rank: int,
                  world: int, pad_id: int) -> list[Batch]:
    """The micro-batches of optimizer step `step` for this rank. The order is a seeded
    permutation per epoch, so it is a pure function of the step (exact resume)."""
    per_step = batch_size * world * accumulation
    epoch, index = divmod(step, len(encoded) // per_step)
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    rows = order[index * per_step:(index + 1) * per_step]
    starts = [(micro * world + rank) * batch_size for micro in range(accumulation)]
    return [collate([encoded[i] for i in rows[start:start + batch_size]], pad_id) for start in starts]


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, media=None,
                      media_inputs=None):
    """Final hidden states at the positions that predict each completion token: [B, C, H].
    media / media_inputs: the prompt's tower outputs and MediaInputs (positions come from the
    whole prompt + completion sequence), or None for text."""
    ids, mask, start = join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)
    hidden = model(ids, mask, return_hidden=True, media=media, media_inputs=media_inputs)  # [B, P + C, H]
    return hidden[:, start - 1:start - 1 + completion_ids.shape[1]]


def towers_train(model) -> bool:
    """Whether the towers have trainable parameters (LoRA with --freeze_vit / --freeze_aligner false)."""
    return any(p.requires_grad for t in (model.audio_tower, model.visual) if t is not None for p in t.parameters())


def tower_outputs(model, batch) -> tuple[list | None, list | None]:
    """(teacher's, student's) tower outputs for a batch, or (None, None) for a model without towers.

    The teacher's come from the towers with LoRA off, without gradient. With frozen towers and the
    same media in both prompts (collate then hands one MediaInputs object to both), that one pass
    serves the student as well: the outputs are identical. Otherwise (other media for the teacher,
    or LoRA on the towers with --freeze_vit false) the student's get a pass of their own. Under
    ZeRO-3 every rank must make the same tower calls (Thinker.encode_media), so the ranks agree on
    whether any of them needs the second pass."""
    if model.audio_tower is None and model.visual is None:
        return None, None
    one_pass = float(batch.teacher_media is batch.student_media and not towers_train(model))
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        one_pass = all_reduce_min(one_pass, batch.student_prompt_ids.device)
    with torch.no_grad(), lora_disabled(model):
        teacher = model.encode_media(batch.teacher_media)
    student = teacher if one_pass else model.encode_media(batch.student_media)
    return teacher, student


@contextmanager
def gathered_lm_head(model):
    """The full lm_head weight [V, H] for the loss, gathered around the block under ZeRO-3
    (frozen, so no gradient flows to it)."""
    w = model.lm_head.weight
    if hasattr(w, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([w]):
            yield w
    else:
        yield w


def gkd_loss_sums(engine, batch, completion_ids, completion_mask, beta: float, temperature: float,
                  with_sft: bool, towers=None):
    """Teacher pass (LoRA off, no grad, teacher prompt) and student pass (LoRA on, student
    prompt) on the same completion tokens -> (JSD sum, SFT sum, completion tokens).
    Logits exist only at completion positions, a chunk at a time. `engine` is the DeepSpeed
    engine (the student's forward goes through it, so its backward hooks see the loss) or a
    plain Thinker. `towers`: the batch's tower_outputs if already computed."""
    model = getattr(engine, "module", engine)
    teacher_media, student_media = towers or tower_outputs(model, batch)
    with torch.no_grad(), lora_disabled(model):
        teacher_h = completion_hidden(model, batch.teacher_prompt_ids, batch.teacher_prompt_mask, completion_ids,
                                      completion_mask, teacher_media, batch.teacher_media)
    student_h = completion_hidden(engine, batch.student_prompt_ids, batch.student_prompt_mask, completion_ids,
                                  completion_mask, student_media, batch.student_media)
    mask = completion_mask.bool().reshape(-1)  # [B * C]
    H = student_h.shape[-1]
    with gathered_lm_head(model) as w:
        jsd, n = chunked_jsd_loss_sum(student_h.reshape(-1, H), teacher_h.reshape(-1, H), w, mask, beta,
                                      temperature)
        sft = (sft_loss_sum(student_h.reshape(-1, H), w, completion_ids.reshape(-1), mask) if with_sft
               else torch.zeros((), device=jsd.device))
    return jsd, sft, int(n)


def all_reduce_sum(x: float, device) -> float:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item()


def all_reduce_min(x: float, device) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t.item()


def train_step(engine, batches: list[Batch], branch: str, sample, beta: float, temperature: float,
               sft_alpha: float, lr: float) -> dict | None:
    """One optimizer step over this rank's micro-batches (every rank calls it in lockstep):
    completions -> teacher pass (LoRA off) -> student pass -> loss -> backward/step.

    `sample(prompt_ids, prompt_mask, media_inputs, media) -> (ids, mask)` draws completions from
    the model as it is (`media`: the prompts' tower outputs, or None to run the towers).
    Returns the step's sums, or None when the loss is not finite on some rank: the step is then
    skipped before any gradient exists."""
    model, device, world = engine.module, batches[0].student_prompt_ids.device, torch.distributed.get_world_size()
    # Frozen towers: one tower pass per prompt serves sampling and both loss passes. Every branch
    # runs it here, before zero3_new_step, so that the traced passes below are the same in each.
    towers = [None] * len(batches) if towers_train(model) else [tower_outputs(model, b) for b in batches]
    t0 = time.time()
    completions = []
    for b, tower in zip(batches, towers):
        if branch == "on-policy":  # the student (LoRA on) answers its own prompt
            completions.append(sample(b.student_prompt_ids, b.student_prompt_mask, b.student_media,
                                      tower and tower[1]))
        elif branch == "teacher-sampled":  # --seq_kd: the teacher (LoRA off) answers its prompt
            with lora_disabled(model):
                completions.append(sample(b.teacher_prompt_ids, b.teacher_prompt_mask, b.teacher_media,
                                          tower and tower[0]))
        else:  # the dataset's answer
            completions.append((b.completion_ids, b.completion_mask))
    sample_seconds = time.time() - t0
    zero3_new_step(engine)  # the passes below repeat from step to step: ZeRO-3 can prefetch
    # the loss is per completion token of the whole global batch: every rank divides by the
    # same count, times world because DeepSpeed averages the ranks' gradients
    tokens = all_reduce_sum(sum(int(mask.sum()) for _, mask in completions), device)
    losses, jsd_sum, sft_sum = [], 0.0, 0.0
    for b, (ids, mask), tower in zip(batches, completions, towers):
        jsd, sft, _ = gkd_loss_sums(engine, b, ids, mask, beta, temperature,
                                    with_sft=sft_alpha > 0 and branch != "on-policy", towers=tower)
        losses.append((jsd + sft_alpha * sft) * world / max(tokens, 1.0))
        jsd_sum, sft_sum = jsd_sum + jsd.item(), sft_sum + sft.item()
    if all_reduce_sum(float(all(torch.isfinite(loss).item() for loss in losses)), device) < world:
        return None
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    for loss in losses:  # one micro-batch at a time; DeepSpeed steps at the accumulation boundary
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
    grad_norm = engine.get_global_grad_norm()
    return {"jsd_sum": all_reduce_sum(jsd_sum, device), "sft_sum": all_reduce_sum(sft_sum, device),
            "tokens": tokens, "sampled": sum(int(mask.sum()) for _, mask in completions) if branch != "dataset" else 0,
            "sample_seconds": sample_seconds,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}


@torch.no_grad()
def evaluate(engine, encoded_eval: list, batch_size: int, pad_id: int, beta: float, temperature: float,
             device) -> float:
    """JSD per completion token on the held-out split's reference completions."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    was_training = engine.module.training
    engine.module.eval()
    zero3_new_step(engine)
    total, tokens = 0.0, 0
    # every rank runs the same number of batches (an empty share repeats row 0 with weight 0)
    for i in range(math.ceil(len(encoded_eval) / (batch_size * world))):
        first = (i * world + rank) * batch_size
        rows = encoded_eval[first:first + batch_size]
        weight = 1.0 if rows else 0.0
        batch = to_device(collate(rows or encoded_eval[:1], pad_id), device)
        jsd, _, n = gkd_loss_sums(engine, batch, batch.completion_ids, batch.completion_mask, beta, temperature,
                                  with_sft=False)
        total += weight * jsd.item()
        tokens += int(weight * n)
    engine.module.train(was_training)
    return all_reduce_sum(total, device) / max(1.0, all_reduce_sum(tokens, device))


@torch.no_grad()
def answers(rows: list, side: str, pad_id: int, sample) -> list[list[int]]:
    """Answers to `rows` (EncodedExamples) from their `side` ("student" or "teacher") prompts, as
    token ids up to and including the end of turn, from the model as it is (LoRA on or off is the
    caller's). Every rank answers its share in lockstep (ZeRO-3: the same forward calls on every
    rank) and all get the whole list. `sample(prompt_ids, prompt_mask, media_inputs) -> (ids, mask)`."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    share = math.ceil(len(rows) / world)
    mine = rows[rank * share:(rank + 1) * share]
    batch = collate(mine or rows[:1], pad_id)  # an empty share answers row 0 and keeps nothing
    ids, mask = sample(getattr(batch, f"{side}_prompt_ids"), getattr(batch, f"{side}_prompt_mask"),
                       getattr(batch, f"{side}_media"))
    found = [row[:n] for row, n in zip(ids.tolist(), mask.sum(1).tolist())][:len(mine)]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, found)
    return [answer for part in everyone for answer in part]


def to_device(batch: Batch, device) -> Batch:
    moved = {f.name: None if value is None else value.to(device)  # no media: None stays None
             for f in fields(batch) for value in [getattr(batch, f.name)] if f.name != "teacher_media"}
    same = batch.teacher_media is batch.student_media  # one MediaInputs for both prompts stays one
    moved["teacher_media"] = moved["student_media"] if same else (
        None if batch.teacher_media is None else batch.teacher_media.to(device))
    return Batch(**moved)


# ----------------------------------------------------------------------------------------------
# 4. The loop
# ----------------------------------------------------------------------------------------------


# Per-step RNG seeds are seed * STEP_SEED_STRIDE + step * world + rank: a prime stride larger than
# any step * world, so no two (seed, step, rank) triples share a dropout / sampling seed.
STEP_SEED_STRIDE = 1_000_003


def stop_requested(device) -> bool:
    """Whether any rank has received SIGTERM (a collective: every rank calls it at the same step)."""
    return all_reduce_sum(1.0 if _Signals.sigterm else 0.0, device) > 0


def train(cfg: Config) -> str:
    """Runs the whole job; returns the path of the final adapter."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    started = time.time()
    log = LOG

    # Everything that can fail cheaply (paths, config, tokenizer, data) runs before deepspeed is
    # imported and before the process group and the model exist: a bad input costs seconds.
    dtype = resolve_dtype(cfg.torch_dtype)
    plan = plan_run(cfg, world)
    tok, encoded, encoded_eval, total = plan.tok, plan.encoded, plan.encoded_eval, plan.total
    resume_path, per_step = plan.resume_path, plan.per_step
    RUN.update(step=plan.resume_step or 0, last_save=resume_path, total=total)
    if rank == 0:
        prepare_output_dir(cfg.output_dir, plan.resume_step, cfg.overwrite_output_dir)
        with open(os.path.join(cfg.output_dir, ARGS_FILE), "w") as f:
            json.dump(args_json(cfg), f, indent=2)
    log.open(os.path.join(cfg.output_dir, LOG_FILE), fresh=plan.resume_step is None)

    log("selfkd: GKD LoRA self-distillation\n" + cfg.describe())
    for bad in plan.data_stats["bad_rows"]:
        log(f"skipped row: {bad}")  # --skip_bad_rows: every skipped row is named, none silently
    for i, row in enumerate(plan.too_long):  # the first few on screen, all in the log
        log(f"skipped row: {row.source}: {row.side} and the completion need {row.needs} tokens > --max_length "
            f"{cfg.max_length}", screen=i < 5)
    if len(plan.too_long) > 5:
        log(f"... {len(plan.too_long) - 5} more skipped rows are listed in {os.path.join(cfg.output_dir, LOG_FILE)}")
    for line in data_report(cfg, plan):
        log(line)
    log(f"world size {world}, {per_step} rows per optimizer step, {plan.steps_per_epoch} steps per epoch, "
        f"{total} steps")
    for note in plan.notes:
        log(note)

    import deepspeed

    ds = deepspeed_config(cfg, dtype, world_size=world)
    if cfg.deepspeed == "zero3" and ds["zero_optimization"]["stage"] == 2:
        log("one process: ZeRO-3 would partition nothing, so --deepspeed zero3 runs as ZeRO-2 here (the "
            "same training, without gathering every weight at every call); zero3_offload keeps the weights in "
            "CPU memory")
    device = init_distributed(cfg)
    has_media = any(e.student_media or e.teacher_media for e in encoded + encoded_eval)
    for line in memory_plan.start_lines(cfg, ds, world, has_media, device,  # the plan's peak; a warning if too big
                                        persistent_numel=ZERO3_PERSISTENT_NUMEL):
        log(line)
    model, summary, sums = build_student(cfg, ds, dtype, device, log, towers=has_media)
    log("Using shared base model architecture:\n"
        "  Student model: base_model + LoRA (trainable)\n"
        "  Teacher model: base_model with LoRA disabled (frozen)\n"
        f"  {summary}")
    optimizer = torch.optim.AdamW([p for _, p in lora_parameters(model)], lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  weight_decay=cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    log(check_weights(engine, sums, dtype))  # what runs, from the live tensors, before any step

    start = load_checkpoint(engine, resume_path, log)["step"] if resume_path else 0
    warning = fixed_point_warning(plan.data_stats["teacher_differs"], cfg.sft_alpha, resuming=resume_path is not None)
    if warning:
        log("\n" + "!" * 100 + "\nWARNING: " + warning + "\n" + "!" * 100 + "\n")
    record = MetricsSink(cfg, rank)
    decode = compiled_decode(model, cfg.compile_decode, device, log)

    def eval_jsd(step: int) -> float:
        value = evaluate(engine, encoded_eval, cfg.per_device_eval_batch_size, tok.pad_id, cfg.beta,
                         cfg.temperature, device)
        if cfg.log_completions:
            log_completions(step)
        return value

    def log_completions(step: int):  # what the model answers now, beside what the teacher answers
        def greedy(ids, mask, media_inputs):
            return sample_completions(engine, ids.to(device), mask.to(device), None,
                                      max_new_tokens=cfg.max_completion_length, temperature=0.0, top_k=0, top_p=1.0,
                                      eos_ids=tok.eos_ids, pad_id=tok.pad_id, gather=cfg.gather_for_generation,
                                      media_inputs=media_inputs and media_inputs.to(device), step=decode)

        rows = encoded_eval[:cfg.log_completions]
        student = answers(rows, "student", tok.pad_id, greedy)
        with lora_disabled(model):
            teacher = answers(rows, "teacher", tok.pad_id, greedy)
        if rank != 0:
            return
        text = tok.readable
        with open(os.path.join(cfg.output_dir, COMPLETIONS_FILE), "a") as f:
            for e, s, t in zip(rows, student, teacher):
                f.write(json.dumps({"step": step, "prompt": text(e.student_prompt_ids),
                                    "reference": text(e.completion_ids), "student": text(s), "teacher": text(t)}) + "\n")
        log(f"answers at step {step}: student {text(student[0])[:100]!r}; teacher {text(teacher[0])[:100]!r} "
            f"(all in {COMPLETIONS_FILE})")

    eval_before = eval_after = eval_step = None
    if encoded_eval:
        eval_before = eval_after = eval_jsd(start)
        eval_step = start
        log(f"eval JSD per token before step {start + 1}: {eval_before:.6f}")
        record({"step": start, "eval_jsd": eval_before})
    nonfinite_in_a_row, last_save, saved_at = 0, resume_path, start if resume_path else None
    window, losses, loop_started = [], [], time.time()
    engine.train()
    for step in range(start, total):
        t0 = time.time()
        step_seed = cfg.seed * STEP_SEED_STRIDE + step * world + rank
        torch.manual_seed(step_seed)  # dropout: a function of the step
        sampler = torch.Generator(device=device).manual_seed(step_seed)

        def sample(prompt_ids, prompt_mask, media_inputs, media):
            return sample_completions(engine, prompt_ids, prompt_mask, sampler,
                                      max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                      top_k=cfg.top_k, top_p=cfg.top_p, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                                      gather=cfg.gather_for_generation, media_inputs=media_inputs, media=media,
                                      step=decode)

        branch = step_branch(step, cfg.seed, cfg.lmbda, cfg.seq_kd)
        batches = [to_device(b, device) for b in micro_batches(
            encoded, step, cfg.seed, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, rank, world,
            tok.pad_id)]
        lr = lr_at(step, total, cfg.learning_rate, cfg.warmup_ratio, cfg.lr_scheduler_type)
        result = train_step(engine, batches, branch, sample, cfg.beta, cfg.temperature, cfg.sft_alpha, lr)

        # the non-finite policy: skip a bad step, abort after too many in a row
        if result is None:
            nonfinite_in_a_row += 1
            log(f"step {step + 1}: non-finite loss on some rank, step skipped "
                f"({nonfinite_in_a_row} in a row, limit {cfg.max_nonfinite_steps})")
            if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise TrainingAborted(f"{nonfinite_in_a_row} non-finite steps in a row; aborting. "
                                      f"Last complete checkpoint: {last_save or 'none'}")
        else:
            nonfinite_in_a_row = 0
            if not math.isfinite(result["grad_norm"]) and cfg.max_grad_norm > 0:
                raise TrainingAborted(f"step {step + 1}: non-finite gradient norm ({result['grad_norm']}) with a "
                                      "finite loss; the LoRA weights may be damaged, so nothing is saved. "
                                      f"Last complete checkpoint: {last_save or 'none'}")
            seconds, tokens = time.time() - t0, result["tokens"]
            jsd = result["jsd_sum"] / max(tokens, 1.0)
            m = {"step": step + 1, "loss": jsd + cfg.sft_alpha * result["sft_sum"] / max(tokens, 1.0),
                 "jsd": jsd, f"loss_{branch}": jsd, "branch": branch, "lr": lr, "grad_norm": result["grad_norm"],
                 "completion_tokens": int(tokens),
                 "generated_tokens_per_s": result["sampled"] * world / max(result["sample_seconds"], 1e-9),
                 "tokens_per_s": tokens / seconds, "samples_per_s": per_step / seconds, "step_seconds": seconds,
                 "peak_memory_gib": peak_memory_gib(device)}
            if step == start:
                log(f"step {step + 1} loss: {m['loss']:.6f} ({branch} completions)")
            if encoded_eval and ((step + 1) % cfg.eval_steps == 0 or step + 1 == total):  # always at the end
                m["eval_jsd"] = eval_after = eval_jsd(step + 1)
                eval_step = step + 1
            m["elapsed_s"] = time.time() - started
            record(m)
            window.append(m)
            losses.append(m["loss"])
            if (step + 1) % cfg.logging_steps == 0 or step + 1 == total or "eval_jsd" in m:
                eta = (time.time() - loop_started) / (step + 1 - start) * (total - step - 1)
                log(progress_line(step + 1, total, window, time.time() - started, eta)
                    + (f"  eval_jsd {m['eval_jsd']:.5f}" if "eval_jsd" in m else ""))
                window = []
        state = {"step": step + 1, "rows_per_step": per_step}  # trainer_state.json
        if (result is not None and (step + 1) % cfg.save_steps == 0) or step + 1 == total:  # always at the end
            last_save = save_checkpoint(engine, cfg.output_dir, step + 1, state, cfg.save_only_model,
                                        cfg.save_total_limit, log)
            saved_at = step + 1
        RUN.update(step=step + 1, last_save=last_save)
        if stop_requested(device):  # SIGTERM on any rank: all of them stop here, after a save
            if saved_at != step + 1:
                last_save = save_checkpoint(engine, cfg.output_dir, step + 1, state, cfg.save_only_model,
                                            cfg.save_total_limit, log)
                RUN.update(last_save=last_save)
            log(f"selfkd: stopped by SIGTERM at step {step + 1} of {total}: saved {last_save}; resume with "
                "--resume_from_checkpoint latest", file=sys.stderr)
            if rank == 0:
                write_curve_quietly(cfg.output_dir)
            record.close()
            raise Stopped(143)
    if encoded_eval:
        if eval_step != total:  # the last step was skipped (non-finite)
            eval_after = eval_jsd(total)
        log(f"final eval JSD per token: {eval_after:.6f}")
    record.close()
    curve = write_curve_quietly(cfg.output_dir) if rank == 0 else None
    if plan.resume_step is not None and rank == 0:  # the closing line compares with the run's first eval
        eval_before = first_eval(cfg.output_dir, eval_before)
    cross_modal = bool(encoded_eval) and all(map(reads_the_media, encoded_eval))
    for line in run_summary(eval_before, eval_after, losses, time.time() - started, last_save, curve,
                            cfg.logging_steps, cross_modal):
        log(line)
    # tear the process group down explicitly: left to interpreter exit, its background threads
    # can abort the process ("terminate called without an active exception") after a good run
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return last_save


def main(argv: list[str] | None = None):
    """`selfkd [COMMAND] FLAGS`: the command line (commands.main), which starts the trainer above."""
    from commands import main as run_command  # the commands sit on top of the trainer, so imported here

    run_command(argv)


if __name__ == "__main__":
    main()
