"""selfkd: GKD LoRA self-distillation for the Qwen3-Omni thinker on raw DeepSpeed ZeRO-3.

The student is the base model + LoRA (trainable); the teacher is the SAME base model with the
LoRA adapters switched off (frozen, no second copy). Each step, with probability `lmbda`, the
student samples the completion (on-policy); otherwise the dataset completion is used. The loss
is the generalized Jensen-Shannon divergence between teacher and student next-token
distributions on the completion tokens.

The file reads top to bottom:
  1. config / flags      parse_args(argv) -> Config, accepting the ms-swift `swift rlhf` flags
  2. sampling loop       sample_completions (KV-cache decoding, ranks step in lockstep)
  3. DeepSpeed setup     deepspeed_config, init_distributed, build_student (loads into ZeRO-3 partitions)
  4. the training step   step_branch, micro_batches, gkd_loss_sums, train_step, evaluate
  5. checkpoints         save_checkpoint / load_checkpoint (atomic, safetensors + JSON)
  6. the loop            plan_run (every cheap check), train, the run's log, metrics, signals
  7. commands            main: train, launch, check, evaluate, generate, export, curve
The loss is in loss.py (a readable spec and the fast kernels), decoding in model_qwen3omni.py.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timedelta
from typing import NoReturn

import torch
import torch.nn.functional as F

from data import (TEACHER_SEES_TRANSCRIPT, Batch, DataError, TooLong, collate, encode_examples,
                  join_prompt_completion, load_dataset_specs, load_tokenizer, render_chat)
from loss import chunked_jsd_loss_sum, sft_loss_sum
from lora import (ADAPTER_CONFIG, ADAPTER_EXTRAS, ADAPTER_WEIGHTS, ALL_TARGETS, adapter_tensors, export_merged,
                  inject_lora, load_adapter, lora_disabled, lora_parameters, write_adapter)
import memory_plan
from model_qwen3omni import (SparseMoE, Thinker, ThinkerConfig, checksum, generate, held_here, load_thinker,
                             load_weights, part_of, resolve_dtype, sample_next)
from tiny import DEFAULT_MODEL_DIR, ensure_default_model

# ----------------------------------------------------------------------------------------------
# 1. Config / flags
# ----------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad command line. `main` prints it as one line and exits with code 2."""


class TrainingAborted(RuntimeError):
    """The run had to stop (non-finite steps, a failed save); `main` exits with code 1."""


def fail(msg: str, code: int = 2) -> NoReturn:
    """One line on stderr (from rank 0 only, when several ranks run) and exit `code`."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"selfkd: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_bool(text: str) -> bool:
    """ms-swift style booleans: true/false/1/0, any case."""
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {text!r}")
    return value


def parse_optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "null") else int(text)


# --deepspeed presets; anything else must be a DeepSpeed JSON config file.
DEEPSPEED_PRESETS = ("zero3", "zero3_offload", "zero2")


def _flag(default, help: str, type=None, aliases: tuple[str, ...] = (), **argparse_kwargs):
    """A Config field that is also a command-line flag `--<field name>`.

    `type` is the argparse converter; it defaults to type(default) (bool gets parse_bool, a
    list default becomes nargs='+' of str).
    """
    meta = dict(help=help, type=type, aliases=aliases, argparse=argparse_kwargs)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- what to train (ms-swift flags) ---
    rlhf_type: str = _flag("gkd", "training algorithm; selfkd implements only 'gkd'")
    model: str | None = _flag(None, "base model directory (None: the embedded default)", type=str)
    teacher_model: str | None = _flag(
        None,
        "must be omitted or the same path as --model: the teacher is the base model with LoRA "
        "disabled, no second model is loaded",
        type=str,
    )
    train_type: str = _flag(
        "lora", "must be 'lora' (the teacher is the base with LoRA off)", aliases=("--tuner_type",)
    )
    torch_dtype: str = _flag(
        "bfloat16", "model dtype: bfloat16, or float32 for CPU debugging (float16 is rejected)"
    )
    lora_rank: int = _flag(8, "LoRA rank r")
    lora_alpha: int = _flag(32, "LoRA alpha; the adapter output is scaled by alpha / r")
    lora_dropout: float = _flag(0.05, "dropout on the LoRA input, in [0, 1)")
    lora_target_modules: list[str] = _flag(
        ["all-linear"],
        "modules that get LoRA ('ALL' / 'all-linear': every linear layer of the thinker's LLM)",
        aliases=("--target_modules",),
    )
    freeze_vit: bool = _flag(
        True, "keep the audio and vision towers frozen; false: LoRA also on their linear layers "
        "(except the aligners), so the student's tower outputs move and the teacher's (LoRA off) do not. "
        "Only matters when the data has media rows (the towers are built only then)"
    )
    freeze_aligner: bool = _flag(
        True, "keep the aligners frozen (audio_tower.proj1/proj2, visual.merger and merger_list, which "
        "project tower features to the LLM width); false: LoRA on their linear layers"
    )
    # --- data ---
    dataset: list[str] = _flag(
        [], "one or more datasets, 'path' or 'path#N' (take N rows); required"
    )
    split_dataset_ratio: float = _flag(0.01, "fraction of rows held out for evaluation, in [0, 1)")
    max_length: int = _flag(2048, "max prompt + completion tokens")
    max_completion_length: int = _flag(512, "max completion tokens (sampled or from the dataset)")
    dataloader_num_workers: int = _flag(
        0,
        "accepted for ms-swift compatibility; selfkd tokenizes the whole dataset up front in the "
        "main process and batches from memory, so no worker processes are started",
    )
    dataset_num_proc: int = _flag(
        1, "accepted for ms-swift compatibility; tokenization runs in-process, single-threaded"
    )
    # --- GKD ---
    seq_kd: bool = _flag(
        False, "when a step is not on-policy, the teacher (LoRA off) generates the completion "
        "instead of taking the dataset's"
    )
    lmbda: float = _flag(0.5, "probability that a step is on-policy (the student samples), in [0, 1]")
    temperature: float = _flag(
        0.9, "sampling temperature, also applied to both sides of the loss (ms-swift semantics)"
    )
    beta: float = _flag(
        0.5, "JSD interpolation in [0, 1]: 0 = forward KL(teacher||student), 1 = reverse KL"
    )
    sft_alpha: float = _flag(
        0.0, "weight of an added cross-entropy term on completions the student did not sample: "
        "the dataset's, or with --seq_kd the teacher's"
    )
    top_k: int = _flag(0, "sampling: keep the k most likely tokens (0 = off)")
    top_p: float = _flag(1.0, "sampling: nucleus mass in (0, 1] (1 = off)")
    teacher_system: str | None = _flag(
        None, "system prompt that only the teacher sees (breaks the student == teacher fixed point)",
        type=str,
    )
    teacher_sees_reference: bool = _flag(
        False, "show the teacher the dataset's reference answer in its prompt (teacher only)"
    )
    teacher_sees_transcript: str = _flag(
        "false", "media rows: the teacher reads the row's caption/transcript text instead of the "
        "image/audio/video the student gets (true), or in addition to it (add): cross-modal distillation",
        choices=TEACHER_SEES_TRANSCRIPT, type=lambda v: {"replace": "true"}.get(str(v).lower(), str(v).lower()),
    )
    skip_bad_rows: bool = _flag(
        False, "skip dataset rows that cannot be parsed or do not fit, instead of failing"
    )
    # --- optimisation ---
    num_train_epochs: float = _flag(3.0, "epochs over the training split (ignored if --max_steps > 0)")
    max_steps: int = _flag(-1, "optimizer steps to run; -1 = from --num_train_epochs")
    per_device_train_batch_size: int = _flag(1, "training rows per GPU per micro-step")
    per_device_eval_batch_size: int = _flag(1, "evaluation rows per GPU")
    gradient_accumulation_steps: int = _flag(1, "micro-steps per optimizer step")
    learning_rate: float = _flag(1e-4, "peak AdamW learning rate")
    lr_scheduler_type: str = _flag(
        "cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant")
    )
    warmup_ratio: float = _flag(0.0, "fraction of the optimizer steps spent in linear warmup")
    weight_decay: float = _flag(0.0, "AdamW weight decay")
    adam_beta1: float = _flag(0.9, "AdamW beta1")
    adam_beta2: float = _flag(0.999, "AdamW beta2")
    adam_epsilon: float = _flag(1e-8, "AdamW epsilon")
    max_grad_norm: float = _flag(1.0, "gradient clipping norm (0 = no clipping)")
    ddp_timeout: int = _flag(
        1800, "seconds a collective may wait for the other ranks before the run fails (a dead rank "
        "then ends the job instead of hanging it)"
    )
    max_nonfinite_steps: int = _flag(
        5, "abort after this many consecutive steps with a non-finite loss or gradient"
    )
    seed: int = _flag(42, "seed for initialisation, data order and the on-policy draws")
    # --- system ---
    deepspeed: str = _flag(
        "zero3",
        "zero3 | zero3_offload (params + optimizer on CPU) | zero2 | path/to/config.json. "
        "selfkd always runs on DeepSpeed, so the default is zero3 rather than 'none'",
    )
    attn_impl: str = _flag(
        "sdpa",
        "recorded for ms-swift compatibility: selfkd always calls torch's "
        "scaled_dot_product_attention; whole-sequence passes (training, scoring) run it causal "
        "without a mask (left pads moved behind each row), so it may pick FlashAttention; decoding "
        "with the KV cache passes a boolean mask (memory-efficient or math kernel)",
        choices=("flash_attention_2", "sdpa", "eager"),
    )
    gradient_checkpointing: bool = _flag(True, "recompute decoder layers in backward to save memory")
    gather_for_generation: bool = _flag(
        True,
        "gather the ZeRO-3 weights once per generation instead of at every decode step "
        "(much faster; costs one full bf16 copy of the model per GPU)",
    )
    estimate_memory: bool = _flag(
        False, "print what each GPU will hold, phase by phase (parameters, optimizer state, ZeRO-3's gathered "
        "weights, activations, loss, generation, checkpoint save), from config.json alone (no weights), and "
        "exit; the last line is 'peak per GPU: X GiB in <phase>'. `bash run.sh check --estimate_memory` plans "
        "the processes run.sh would start"
    )
    world_size: int | None = _flag(
        None, "processes (GPUs) --estimate_memory plans for (None: $WORLD_SIZE, else the local GPUs, else 1)",
        type=parse_optional_int
    )
    # --- outputs ---
    output_dir: str = _flag("output", "where checkpoints and logs go")
    eval_steps: int = _flag(500, "evaluate every N optimizer steps")
    save_steps: int = _flag(500, "save every N optimizer steps")
    save_total_limit: int | None = _flag(
        None, "keep at most N checkpoints (None = keep all)", type=parse_optional_int
    )
    logging_steps: int = _flag(
        5, "print a progress line every N optimizer steps (averages over those steps); metrics.jsonl "
        "gets every step"
    )
    report_to: str = _flag(
        "none", "also send the metrics to: none, or tensorboard (torch's SummaryWriter into "
        "<output_dir>/runs; needs the tensorboard package)", choices=("none", "tensorboard")
    )
    save_only_model: bool = _flag(
        False, "true: write only the LoRA adapter; false: also the AdamW state (fp32 master weights "
        "and moments), so that --resume_from_checkpoint continues exactly (the learning rate, data "
        "order and random draws are functions of the step and need no saved state)"
    )
    overwrite_output_dir: bool = _flag(
        False, "start a new run in an --output_dir that holds another run's checkpoints, deleting "
        "them (without it such a directory is refused)"
    )
    resume_from_checkpoint: str | None = _flag(
        None, "checkpoint directory, or 'latest' (newest in --output_dir)", type=str
    )

    def describe(self) -> str:
        """The resolved config as aligned `key: value` lines."""
        width = max(len(f.name) for f in fields(self)) + 1
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = " ".join(value)
            lines.append(f"{f.name + ':':<{width}} {value}")
        return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults shown, the description's line breaks kept."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="selfkd",
        usage=USAGE,
        description=DESCRIPTION,
        allow_abbrev=False,  # '--lr' must not silently mean '--lr_scheduler_type'
        formatter_class=_HelpFormatter,
    )
    for f in fields(Config):
        meta = f.metadata
        default = f.default if f.default is not MISSING else f.default_factory()
        kwargs = dict(meta["argparse"])
        convert = meta["type"] or type(default)
        if convert is bool:
            # '--flag' alone means true, as in HfArgumentParser / ms-swift
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="{true,false}")
        elif isinstance(default, list):
            kwargs.update(type=str, nargs="+")
        else:
            kwargs.update(type=convert)
        parser.add_argument(
            f"--{f.name}", *meta["aliases"], dest=f.name, default=default, help=meta["help"],
            **kwargs,
        )
    parser.add_argument(
        "--local_rank", type=int, default=-1,
        help="accepted and ignored: the deepspeed launcher passes it; selfkd reads LOCAL_RANK",
    )
    return parser


def _unknown_flags_message(extras: list[str], parser: argparse.ArgumentParser) -> str:
    known = [s for action in parser._actions for s in action.option_strings]
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
    if not flags:
        return f"unexpected argument(s) {' '.join(extras)!r}: every value must follow a --flag"
    parts = []
    for flag in flags:
        close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        parts.append(f"unknown flag {flag}{hint}")
    return "; ".join(parts)


def _same_path(a: str, b: str) -> bool:
    norm = lambda p: os.path.normcase(os.path.realpath(os.path.expanduser(p)))  # noqa: E731
    return norm(a) == norm(b)


def _check(ok: bool, flag: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"--{flag} {value}: {rule}")


def _validate(c: Config) -> None:
    """Every check that needs no model, data or GPU, so a bad flag fails in milliseconds."""
    _check(c.rlhf_type == "gkd", "rlhf_type", c.rlhf_type, "selfkd implements only 'gkd'")
    _check(
        c.train_type == "lora", "train_type", c.train_type,
        "GKD requires the model to have LoRA adapters: selfkd's teacher is the base model with "
        "LoRA disabled, so LoRA is required; use --train_type lora",
    )
    if c.teacher_model is not None:
        _check(
            c.model is not None, "teacher_model", c.teacher_model,
            "needs --model as well (the teacher is --model with LoRA disabled)",
        )
        _check(
            _same_path(c.teacher_model, c.model), "teacher_model", c.teacher_model,
            f"differs from --model {c.model}. selfkd's teacher is the base model with LoRA "
            "disabled (no second model is loaded); omit --teacher_model or pass the same path",
        )
    _check(
        c.torch_dtype != "float16", "torch_dtype", c.torch_dtype,
        "not supported: the Qwen3-Omni weights are bf16 and fp16 training would need loss "
        "scaling and risks overflow; use bfloat16 (or float32 for CPU debugging)",
    )
    _check(c.torch_dtype in ("bfloat16", "float32"), "torch_dtype", c.torch_dtype,
           "expected bfloat16 or float32")
    _check(c.lora_rank > 0, "lora_rank", c.lora_rank, "must be > 0")
    _check(c.lora_alpha > 0, "lora_alpha", c.lora_alpha, "must be > 0")
    _check(0 <= c.lora_dropout < 1, "lora_dropout", c.lora_dropout, "must be in [0, 1)")
    _check(len(c.dataset) > 0, "dataset", "(missing)", "at least one dataset is required")
    _check(0 <= c.split_dataset_ratio < 1, "split_dataset_ratio", c.split_dataset_ratio,
           "must be in [0, 1)")
    _check(c.max_length > 0, "max_length", c.max_length, "must be > 0")
    _check(0 < c.max_completion_length < c.max_length, "max_completion_length",
           c.max_completion_length, f"must be > 0 and < --max_length ({c.max_length}), "
           "leaving room for the prompt")
    _check(c.dataloader_num_workers >= 0, "dataloader_num_workers", c.dataloader_num_workers,
           "must be >= 0")
    _check(c.dataset_num_proc >= 1, "dataset_num_proc", c.dataset_num_proc, "must be >= 1")
    _check(0 <= c.lmbda <= 1, "lmbda", c.lmbda, "must be in [0, 1] (a probability)")
    _check(0 <= c.beta <= 1, "beta", c.beta, "must be in [0, 1]")
    _check(c.temperature > 0, "temperature", c.temperature, "must be > 0")
    _check(c.sft_alpha >= 0, "sft_alpha", c.sft_alpha, "must be >= 0")
    _check(c.top_k >= 0, "top_k", c.top_k, "must be >= 0 (0 = off)")
    _check(0 < c.top_p <= 1, "top_p", c.top_p, "must be in (0, 1] (1 = off)")
    _check(c.num_train_epochs > 0, "num_train_epochs", c.num_train_epochs, "must be > 0")
    _check(c.max_steps == -1 or c.max_steps > 0, "max_steps", c.max_steps,
           "must be > 0, or -1 to derive it from --num_train_epochs")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "eval_steps", "save_steps", "logging_steps",
                 "max_nonfinite_steps", "ddp_timeout"):
        _check(getattr(c, name) > 0, name, getattr(c, name), "must be > 0")
    _check(c.learning_rate > 0, "learning_rate", c.learning_rate, "must be > 0")
    _check(0 <= c.warmup_ratio <= 1, "warmup_ratio", c.warmup_ratio, "must be in [0, 1]")
    _check(c.weight_decay >= 0, "weight_decay", c.weight_decay, "must be >= 0")
    _check(0 <= c.adam_beta1 < 1, "adam_beta1", c.adam_beta1, "must be in [0, 1)")
    _check(0 <= c.adam_beta2 < 1, "adam_beta2", c.adam_beta2, "must be in [0, 1)")
    _check(c.adam_epsilon > 0, "adam_epsilon", c.adam_epsilon, "must be > 0")
    _check(c.max_grad_norm >= 0, "max_grad_norm", c.max_grad_norm, "must be >= 0 (0 = no clipping)")
    _check(c.world_size is None or c.world_size > 0, "world_size", c.world_size, "must be > 0")
    _check(c.save_total_limit is None or c.save_total_limit >= 1, "save_total_limit",
           c.save_total_limit, "must be >= 1, or None to keep every checkpoint")
    if c.deepspeed not in DEEPSPEED_PRESETS:
        _check(c.deepspeed.endswith(".json") and os.path.isfile(c.deepspeed), "deepspeed",
               c.deepspeed, f"expected one of {', '.join(DEEPSPEED_PRESETS)} or an existing "
               ".json config file")
        try:
            with open(c.deepspeed) as fh:
                ok = isinstance(json.load(fh), dict)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--deepspeed {c.deepspeed}: cannot read it as JSON ({e})") from e
        _check(ok, "deepspeed", c.deepspeed, "the JSON file must hold an object")
        with open(c.deepspeed) as fh:
            _check_partitioning(json.load(fh).get("zero_optimization") or {}, c.deepspeed)
    if c.resume_from_checkpoint not in (None, "latest"):
        _check(os.path.isdir(c.resume_from_checkpoint), "resume_from_checkpoint",
               c.resume_from_checkpoint, "no such directory (or pass 'latest')")


# ZeRO-3 partitionings other than DeepSpeed's default (equal flat slices in global rank order),
# where build_student would fill the partitions with the wrong slices: key -> value that turns it off.
UNSUPPORTED_PARTITIONING = {"mics_shard_size": -1, "zero_hpz_partition_size": 1, "zero_quantized_weights": False,
                            "zero_quantized_nontrainable_weights": False}


def _check_partitioning(zero: dict, source: str) -> None:
    for key, off in UNSUPPORTED_PARTITIONING.items():
        value = zero.get(key, off)
        if value != off and not (key == "mics_shard_size" and value in (0, -1)):
            raise ConfigError(f"--deepspeed {source}: zero_optimization.{key} = {value} is not supported: selfkd "
                              f"streams the checkpoint into DeepSpeed's default ZeRO-3 partitions and would load "
                              f"wrong slices under it; remove the key (or set it to {off})")


def parse_args(argv: list[str]) -> Config:
    """Command line -> validated Config. Raises ConfigError naming the offending flag."""
    parser = _build_parser()
    namespace, extras = parser.parse_known_args(argv)
    if extras:
        raise ConfigError(_unknown_flags_message(extras, parser))
    values = vars(namespace)
    values.pop("local_rank")
    config = Config(**values)
    _validate(config)
    return config


# ----------------------------------------------------------------------------------------------
# 2. Sampling loop
# ----------------------------------------------------------------------------------------------


def sample_completions(engine, prompt_ids, prompt_mask, generator, *, max_new_tokens: int, temperature: float,
                       top_k: int, top_p: float, eos_ids, pad_id: int, gather: bool, media_inputs=None, media=None):
    """Completions [B, C] and their mask (1 up to and including the first eos) sampled from the
    model as it is now (LoRA on: the student; inside lora_disabled: the teacher). `engine` is the
    DeepSpeed engine or a plain Thinker.

    Under ZeRO-3 every rank must make the same number of forward calls, so ranks agree on when
    all of them are done. With `gather` the weights are gathered once for the whole generation
    instead of at every decode step. `media_inputs`: the prompts' media (MediaInputs) or None;
    `media`: their tower outputs when already computed (the towers then do not run again)."""
    model = getattr(engine, "module", engine)
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

    def pick(logits):
        logits[:, placeholders] = float("-inf")
        return sample_next(logits, temperature, top_k, top_p, generator)

    was_training = model.training
    model.eval()  # no LoRA dropout while sampling
    try:
        with gathered_for_generation(engine, gather):
            return generate(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id,
                            pick_next=pick, all_done=all_done, media_inputs=media_inputs, media=media)
    finally:
        model.train(was_training)


@contextmanager
def gathered_for_generation(engine, enabled: bool):
    """ZeRO-3: gather every weight once and detach DeepSpeed's per-module hooks for the
    duration (as TRL's ds3_gather_for_generation does); other stages: nothing to do.

    Putting the hooks back would make DeepSpeed drop its record of the training passes' fetch
    order (see zero3_new_step), so the coordinator is kept aside meanwhile and the modules get
    their ids back: the record stays right, and the passes after sampling still prefetch."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if not enabled or offload is None:
        yield
        return
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
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
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        return
    if not getattr(offload, "selfkd_steps", False):  # once: drop the reset at every top-level forward
        offload.fwd_pre_hook.remove()
        offload.selfkd_steps = True
    offload.get_param_coordinator().reset_step()


# ----------------------------------------------------------------------------------------------
# 3. DeepSpeed setup
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
        mine = part_of(param, value).to(device=held_here(param).device, dtype=dtype)
        held_here(param).copy_(mine)
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
    zero = engine.optimizer  # ZeRO-3's flat fp32 partitions, ZeRO-1/2's; without ZeRO the LoRA weights themselves
    masters = (getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups",
                                                                              None) or list(lora.values()))
    problems += [f"the optimizer's master copy is {dtype_name(m.dtype)}, expected float32"
                 for m in masters[:1] if m.dtype != torch.float32]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, problems)
    found = [f"rank {r}: {p}" for r, mine in enumerate(everyone) for p in mine]
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise TrainingAborted(f"the model as built is not what was asked: {found[0]}{more}")
    master = dtype_name(masters[0].dtype) if masters else "none"
    return (f"runs: base {dtype_name(dtype)} {asked}, {len(sums)} tensors equal to the checkpoint on every rank; "
            f"LoRA {dtype_name(dtype)}; optimizer master {master}")


# ----------------------------------------------------------------------------------------------
# 4. The training step
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


def to_device(batch: Batch, device) -> Batch:
    moved = {f.name: None if value is None else value.to(device)  # no media: None stays None
             for f in fields(batch) for value in [getattr(batch, f.name)] if f.name != "teacher_media"}
    same = batch.teacher_media is batch.student_media  # one MediaInputs for both prompts stays one
    moved["teacher_media"] = moved["student_media"] if same else (
        None if batch.teacher_media is None else batch.teacher_media.to(device))
    return Batch(**moved)


# ----------------------------------------------------------------------------------------------
# 5. Checkpoints: written to a temporary directory and renamed, so a crash never leaves a
#    half-written checkpoint that resume would pick. `trainer_state.json` is written last.
# ----------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE, OPTIMIZER_FILE = "trainer_state.json", "optimizer.safetensors"


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            path = os.path.join(output_dir, name)
            if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit() \
                    and os.path.isfile(os.path.join(path, STATE_FILE)):
                found.append((int(name[len(CHECKPOINT_PREFIX):]), path))
    return sorted(found)


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inner_optimizer(engine):
    return engine.optimizer.optimizer


def optimizer_tensors(engine) -> dict[str, torch.Tensor]:
    """Full fp32 master weights and AdamW moments of the LoRA parameters, on rank 0 ({} on the
    others). Under ZeRO each tensor is gathered collectively, so every rank calls this; the
    others drop each tensor at once, so no rank but rank 0 ever holds more than one of them
    (the whole state is ~3.9 GB for the 30B model's LoRA)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    keep = torch.distributed.get_rank() == 0
    out = {}
    for name, p in lora_parameters(engine.module):
        gathered = {"fp32": safe_get_full_fp32_param(p)}
        for key in ("exp_avg", "exp_avg_sq"):
            gathered[key] = safe_get_full_optimizer_state(p, key)
        if keep:
            out.update({f"{name}.{key}": t.detach().float().cpu().clone() for key, t in gathered.items()})
    return out


def restore_optimizer(engine, tensors: dict, adam_steps: int):
    """Put saved master weights and moments back. DeepSpeed's AdamW creates its state lazily at
    the first step, so first run one step on every fp32 partition with zero gradients and lr 0
    (a no-op on the weights), the way DeepSpeed's own step feeds partitions to the optimizer."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero, inner = engine.optimizer, _inner_optimizer(engine)
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3 leaves param_groups empty between steps
        partitions = [(zero.sub_group_to_group_id[i], p) for i, p in enumerate(zero.fp32_partitioned_groups_flat)]
    else:
        partitions = [(i, p) for i, g in enumerate(inner.param_groups) for p in g["params"]]
    for group_id, p in partitions:
        group = inner.param_groups[group_id]
        kept, lr, grad = group["params"], group["lr"], p.grad  # (offloaded: a gradient buffer kept for good)
        group["params"], group["lr"], p.grad = [p], 0.0, torch.zeros_like(p)
        inner.step()
        group["params"], group["lr"], p.grad = kept, lr, grad
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link the moments to the
        zero._lazy_init_hp_params_optimizer_state()  # parameters after their first step: do it now
    for name, p in lora_parameters(engine.module):
        safe_set_full_fp32_param(p, tensors[f"{name}.fp32"])
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, tensors[f"{name}.{key}"], key)
    for state in inner.state.values():
        state["step"] = torch.tensor(float(adam_steps)) if torch.is_tensor(state.get("step")) else adam_steps


def _adam_steps(engine) -> int:
    steps = [s["step"] for s in _inner_optimizer(engine).state.values() if "step" in s]
    return int(steps[0]) if steps else 0


def save_checkpoint(engine, output_dir: str, step: int, state: dict, save_only_model: bool,
                    save_total_limit: int | None, log) -> str:
    """Every rank calls this. Returns the checkpoint path.

    The collectives (gathering the adapter and optimizer state) come first, on every rank; then
    rank 0 alone writes, and whatever goes wrong there (disk full, permissions, a safetensors
    error) is caught and broadcast, so every rank raises within seconds, the temporary directory
    is removed and older checkpoints are untouched."""
    from safetensors.torch import save_file

    rank = torch.distributed.get_rank()
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    adapter = adapter_tensors(engine.module)
    opt = None if save_only_model else optimizer_tensors(engine)
    adam_steps = _adam_steps(engine)
    error = ""
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            write_adapter(engine.module, adapter, tmp)
            if opt is not None:
                save_file(opt, os.path.join(tmp, OPTIMIZER_FILE))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:  # last: its presence = complete
                json.dump(dict(state, step=step, adam_steps=adam_steps, save_only_model=save_only_model), f,
                          indent=2)
            for name in os.listdir(tmp):
                with open(os.path.join(tmp, name), "rb") as f:
                    os.fsync(f.fileno())
            if os.path.exists(final):  # a re-run of the same step replaces it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(output_dir)
            with open(os.path.join(output_dir, "latest.tmp"), "w") as f:
                f.write(os.path.basename(final) + "\n")
            os.replace(os.path.join(output_dir, "latest.tmp"), os.path.join(output_dir, "latest"))
            RUN["last_save"] = final  # complete on disk: a failure in the collectives below must name it
        except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks
            error = f"writing checkpoint {final!r} failed: {type(err).__name__}: {err}"
            shutil.rmtree(tmp, ignore_errors=True)
    error = _broadcast_error(error)
    if error:
        raise TrainingAborted(f"{error}. Previous checkpoints in {output_dir!r} are intact.")
    if rank == 0 and save_total_limit is not None:
        older = [path for _, path in complete_checkpoints(output_dir) if path != final]
        for path in older[:max(0, len(older) - (save_total_limit - 1))]:  # never the one just written
            shutil.rmtree(path, ignore_errors=True)
    torch.distributed.barrier()
    log(f"saved {final}")
    return final


def _broadcast_error(error: str) -> str:
    """Rank 0's error (or "") on every rank."""
    box = [error]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def resolve_resume(cfg: Config) -> str | None:
    if cfg.resume_from_checkpoint in (None, ""):
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = complete_checkpoints(cfg.output_dir)
        if not found:
            raise ConfigError(f"--resume_from_checkpoint latest: no complete checkpoint in {cfg.output_dir!r}")
        return found[-1][1]
    path = cfg.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ConfigError(f"--resume_from_checkpoint {path!r}: not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(engine, path: str, log) -> dict:
    from safetensors.torch import load_file

    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    load_adapter(engine.module, path)
    opt_file = os.path.join(path, OPTIMIZER_FILE)
    if os.path.isfile(opt_file):
        tensors = load_file(opt_file)
        want = {f"{n}.{key}" for n, _ in lora_parameters(engine.module) for key in ("fp32", "exp_avg", "exp_avg_sq")}
        if missing := sorted(want - tensors.keys()):
            raise ConfigError(f"{opt_file}: no optimizer state for {missing[0]} ({len(missing)} tensors missing; "
                              "written for other LoRA parameter names): delete the file to resume from the "
                              "adapter with a fresh optimizer")
        restore_optimizer(engine, tensors, state["adam_steps"])
        log(f"resumed from {path} at step {state['step']} (adapter, optimizer state)")
    else:
        log(f"resumed from {path} at step {state['step']}: adapter only (saved with --save_only_model true), "
            "the optimizer starts fresh")
    return state


# ----------------------------------------------------------------------------------------------
# 6. The loop
# ----------------------------------------------------------------------------------------------


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(round(max(0.0, seconds)))))


def progress_line(step: int, total: int, window: list[dict], elapsed: float, eta: float) -> str:
    """One line per logging window: loss, tokens/s and samples/s averaged over the window's steps,
    the learning rate now, where the window's completions came from, elapsed time and ETA."""
    done = int(20 * step / total)
    loss = sum(m["loss"] for m in window) / len(window)
    seconds = max(sum(m["step_seconds"] for m in window), 1e-9)
    tokens = sum(m["completion_tokens"] for m in window)
    samples = sum(m["samples_per_s"] * m["step_seconds"] for m in window)
    branches = Counter(m["branch"] for m in window)
    branch = next(iter(branches)) if len(branches) == 1 else ", ".join(f"{b} {n}" for b, n in branches.items())
    average = f" (avg of {len(window)})" if len(window) > 1 else ""
    return (f"[{'#' * done}{'.' * (20 - done)}] step {step}/{total}  loss {loss:.5f}{average}  "
            f"lr {window[-1]['lr']:.2e}  tok/s {tokens / seconds:.0f}  samples/s {samples / seconds:.2f}  "
            f"branch={branch}  elapsed {_clock(elapsed)}  eta {_clock(eta)}")


def fixed_point_warning(teacher_differs: int, sft_alpha: float, resuming: bool) -> str | None:
    """The one place that decides whether training can move at all. With no row whose teacher
    prompt differs from the student's, no SFT term and a fresh adapter (B = 0), student ==
    teacher: the divergence and its gradient are exactly 0 at every step."""
    if teacher_differs or sft_alpha > 0 or resuming:
        return None
    return ("the teacher sees exactly what the student sees and the LoRA starts at B = 0, so "
            "student == teacher: the divergence and its gradient are exactly 0 and training "
            "cannot move. Give the teacher privileged context (--teacher_system, "
            "--teacher_sees_reference, or per-row teacher context in the data), add --sft_alpha > 0, "
            "or resume from a trained adapter.")


def refuse_output_dir(output_dir: str, resume_step: int | None, overwrite: bool) -> None:
    """A directory holding checkpoints belongs to another run: refuse it unless resuming or told
    to overwrite. Changes nothing (the launcher calls it before any rank starts)."""
    found = complete_checkpoints(output_dir)
    if resume_step is None and found and not overwrite:
        raise ConfigError(f"--output_dir {output_dir!r} already holds checkpoints ({found[-1][1]}); "
                          "continue that run with --resume_from_checkpoint latest, start over with "
                          "--overwrite_output_dir true, or choose another --output_dir")


def prepare_output_dir(output_dir: str, resume_step: int | None, overwrite: bool) -> None:
    """Rank 0, before training. refuse_output_dir, then: on resume from step k, the checkpoints
    after k and the metrics rows after k belong to the abandoned continuation of that run: drop
    them, so that they can neither be mixed with this run's nor rotated in place of its checkpoints."""
    refuse_output_dir(output_dir, resume_step, overwrite)
    found = complete_checkpoints(output_dir)
    newer = [path for step, path in found if resume_step is None or step > resume_step]
    for path in newer:
        shutil.rmtree(path)
    metrics = os.path.join(output_dir, METRICS_FILE)
    if os.path.isfile(metrics):
        with open(metrics) as f:
            rows = [line for line in f if resume_step is not None and json.loads(line).get("step", 0) <= resume_step]
        with open(metrics, "w") as f:
            f.writelines(rows)
    if (newer or resume_step is None) and os.path.exists(os.path.join(output_dir, "latest")):
        os.remove(os.path.join(output_dir, "latest"))


METRICS_FILE, LOG_FILE, CURVE_FILE, ARGS_FILE = "metrics.jsonl", "train.log", "curve.png", "args.json"
# Per-step RNG seeds are seed * STEP_SEED_STRIDE + step * world + rank: a prime stride larger than
# any step * world, so no two (seed, step, rank) triples share a dropout / sampling seed.
STEP_SEED_STRIDE = 1_000_003


class RunLog:
    """What the user reads: rank 0 prints it and appends it to <output_dir>/train.log; the other
    ranks stay silent, so every message appears once whatever the process count."""

    def __init__(self):
        self.file = None

    @staticmethod
    def rank() -> int:
        return int(os.environ.get("RANK", 0))

    def open(self, path: str, fresh: bool):
        if self.rank() == 0:
            self.file = open(path, "w" if fresh else "a", buffering=1)  # line-buffered
            self.file.write(f"--- selfkd {'run' if fresh else 'resumed run'} started "
                            f"{datetime.now().isoformat(timespec='seconds')}: {' '.join(sys.argv)}\n")

    def __call__(self, msg: str, file=None, screen: bool = True):
        if self.rank() != 0:
            return
        if screen:
            print(msg, file=file or sys.stdout, flush=True)
        if self.file is not None:
            self.file.write(msg + "\n")

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


LOG = RunLog()
# Where a run is, for the messages of an interrupted or stopped run.
RUN = {"step": None, "last_save": None, "total": None}


# --- signals ----------------------------------------------------------------------------------
# Ctrl-C (SIGINT, to the launcher, which passes it on, or to every rank) stops at once: every
# rank raises KeyboardInterrupt, rank 0 prints one line naming the last complete checkpoint,
# all exit 130. SIGTERM (what a cluster sends before pre-emption) only sets a flag; the ranks
# agree on it at the next step boundary (one all-reduce per step), save a checkpoint there and
# exit 143.


class Stopped(Exception):
    """Raised on every rank after the SIGTERM checkpoint is saved."""

    def __init__(self, code: int):
        super().__init__(f"stopped with exit code {code}")
        self.code = code


class _Signals:
    sigint = False
    sigterm = False
    quiet = False  # on the way out: a later signal only sets its flag


def _on_sigint(signum, frame):
    first = not _Signals.sigint
    _Signals.sigint = True
    if first and not _Signals.quiet:
        raise KeyboardInterrupt


def _on_sigterm(signum, frame):
    _Signals.sigterm = True


def stop_requested(device) -> bool:
    """Whether any rank has received SIGTERM (a collective: every rank calls it at the same step)."""
    return all_reduce_sum(1.0 if _Signals.sigterm else 0.0, device) > 0


# --- what the user is told about the data and the run -------------------------------------------

REASON_WORDS = {
    "malformed_json": "malformed JSON", "invalid_utf8": "invalid UTF-8", "wrong_type": "wrong type",
    "missing_field": "missing field", "empty_completion": "empty completion", "unknown_format": "unknown format",
    "bad_conversation": "bad conversation", "skipped_prompt_too_long": "prompt does not fit --max_length",
    "completion_truncated": "completion", "student_prompt_truncated": "student prompt",
    "teacher_prompt_truncated": "teacher prompt",
}


def in_words(counts: dict) -> str:
    """{'malformed_json': 2, 'wrong_type': 1} -> 'malformed JSON 2, wrong type 1' ('none' if empty)."""
    return ", ".join(f"{REASON_WORDS.get(k, k.replace('_', ' '))} {v}" for k, v in counts.items() if v) or "none"


@dataclass
class RunPlan:
    """What a run will do, worked out before any process group or model exists."""
    tok: object
    encoded: list
    encoded_eval: list
    data_stats: dict
    truncated: Counter  # rows cut to fit, train + eval, by kind
    too_long: list[TooLong]  # the rows that could not fit
    per_step: int
    steps_per_epoch: int
    total: int
    resume_path: str | None
    resume_step: int | None


def check_model_files(path: str) -> None:
    """Every shard the checkpoint lists is there and its header reads (no tensor is loaded)."""
    from safetensors import safe_open

    from model_qwen3omni import _shard_map

    for shard in sorted(set(_shard_map(path).values())):
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"shard {shard!r} is listed in the index but does not exist")
        try:
            with safe_open(shard, framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"shard {shard!r} cannot be read: {err}") from err


def plan_run(cfg: Config, world: int) -> RunPlan:
    """Every check that needs no process group and no model weights: the model directory, the
    tokenizer, the whole dataset (read and tokenized), the step count, the output directory.
    The launcher (`selfkd launch`, run.sh) runs it once in one process before starting the
    ranks, so a bad input gives one line and exit code 2; each rank runs it again."""
    resolve_dtype(cfg.torch_dtype)
    if cfg.model is None:
        if not os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "model.safetensors.index.json")):
            LOG(f"writing the embedded default model (a tiny random Qwen3-Omni) to {DEFAULT_MODEL_DIR} (once)")
        cfg.model = ensure_default_model()  # atomic: safe when every rank calls it
    ThinkerConfig.from_pretrained(cfg.model)
    check_model_files(cfg.model)
    check_writable(cfg.output_dir)
    resume_path = resolve_resume(cfg)
    tok = load_tokenizer(cfg.model)
    train_rows, eval_rows, data_stats = load_dataset_specs(
        cfg.dataset, cfg.seed, cfg.split_dataset_ratio, teacher_system=cfg.teacher_system,
        teacher_sees_reference=cfg.teacher_sees_reference, skip_bad_rows=cfg.skip_bad_rows,
        teacher_sees_transcript=cfg.teacher_sees_transcript)
    too_long = []
    encoded, truncated = encode_examples(tok, train_rows, cfg.max_length, cfg.max_completion_length, skipped=too_long)
    encoded_eval = []
    if eval_rows:
        encoded_eval, eval_truncated = encode_examples(tok, eval_rows, cfg.max_length, cfg.max_completion_length,
                                                       skipped=too_long)
        truncated = truncated + eval_truncated
    truncated.pop("skipped_prompt_too_long", None)  # counted in too_long
    # of the training rows that fit: those whose teacher prompt differs from the student's, in its
    # tokens or in its media (the same placeholder count can hold another picture)
    data_stats["teacher_differs"] = sum(e.teacher_prompt_ids != e.student_prompt_ids
                                        or e.teacher_media != e.student_media for e in encoded)
    per_step = cfg.per_device_train_batch_size * world * cfg.gradient_accumulation_steps
    steps_per_epoch = len(encoded) // per_step
    if steps_per_epoch == 0:
        dropped = f" ({len(too_long)} rows did not fit --max_length {cfg.max_length})" if too_long else ""
        raise ConfigError(f"{len(encoded)} training rows{dropped} cannot fill one step of {per_step} rows "
                          f"(batch size {cfg.per_device_train_batch_size} x {world} processes x gradient "
                          f"accumulation {cfg.gradient_accumulation_steps}); use a smaller "
                          "--per_device_train_batch_size, fewer processes (NPROC=1 bash run.sh), or more rows")
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
    resume_step = None
    if resume_path:
        with open(os.path.join(resume_path, STATE_FILE)) as f:
            resume_step = json.load(f)["step"]
    refuse_output_dir(cfg.output_dir, resume_step, cfg.overwrite_output_dir)
    if cfg.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"--report_to tensorboard: cannot import torch's SummaryWriter ({err}); "
                              "install it with `.venv/bin/pip install tensorboard`, or use --report_to none "
                              "(metrics.jsonl and curve.png are always written)") from err
    return RunPlan(tok, encoded, encoded_eval, data_stats, truncated, too_long, per_step, steps_per_epoch, total,
                   resume_path, resume_step)


def data_report(cfg: Config, plan: RunPlan) -> list[str]:
    """The data line, then a WARNING for every kind of loss above 10% of the rows."""
    stats = plan.data_stats
    skipped = Counter(stats["rows_skipped"])
    skipped["skipped_prompt_too_long"] = len(plan.too_long)
    n_skipped = sum(skipped.values())
    formats = ", ".join(f"{k} {v}" for k, v in stats["formats"].items())
    lines = [f"data: {stats['rows_read']} rows read ({formats}); {len(plan.encoded)} train / "
             f"{len(plan.encoded_eval)} eval; skipped: {f'{n_skipped} ({in_words(skipped)})' if n_skipped else 'none'}; "
             f"truncated: {in_words(plan.truncated)}; {stats['teacher_differs']} train rows give the teacher "
             "privileged context"]
    bad = sum(stats["rows_skipped"].values())
    if bad > 0.1 * stats["rows_read"]:
        lines.append(f"WARNING: {bad} of {stats['rows_read']} rows ({bad / stats['rows_read']:.0%}) could not be "
                     f"read and were skipped ({in_words(stats['rows_skipped'])}); see the 'skipped row' lines above")
    encoded_rows = len(plan.encoded) + len(plan.encoded_eval)
    considered = encoded_rows + len(plan.too_long)
    if len(plan.too_long) > 0.1 * considered:
        lo, hi = min(plan.too_long, key=lambda t: t.need), max(plan.too_long, key=lambda t: t.need)
        lines.append(f"WARNING: {len(plan.too_long)} of {considered} rows ({len(plan.too_long) / considered:.0%}) were "
                     f"skipped: the final user turn and the completion need {lo.needs} to {hi.needs} tokens, more "
                     f"than --max_length {cfg.max_length} (e.g. {plan.too_long[0].source}: {plan.too_long[0].side}); "
                     + (f"--max_length {hi.need} keeps every row" if hi.exact else f"one row needs {hi.needs} tokens"))
    fixes = {"completion_truncated": f"completions cut to --max_completion_length {cfg.max_completion_length} "
                                     "(a cut completion has no end of turn); raise it to keep whole answers",
             "student_prompt_truncated": f"student prompts cut from the left (oldest turns first) to fit "
                                         f"--max_length {cfg.max_length}; raise it to keep whole conversations",
             "teacher_prompt_truncated": f"teacher prompts (with their privileged context) cut from the left to fit "
                                         f"--max_length {cfg.max_length}; raise it to keep the whole context"}
    for kind, n in plan.truncated.items():
        if encoded_rows and n > 0.1 * encoded_rows:
            lines.append(f"WARNING: {n} of {encoded_rows} rows ({n / encoded_rows:.0%}) had their {fixes[kind]}")
    return lines


def run_summary(eval_before, eval_after, losses: list[float], seconds: float, adapter: str, curve: str | None,
                logging_steps: int) -> list[str]:
    """The last lines of a run: what changed, where everything is, what to do with it."""
    if eval_before is not None and eval_after is not None:
        change = f" ({(eval_after - eval_before) / eval_before:+.0%})" if eval_before > 0 else ""
        what = f"eval JSD {eval_before:.4f} -> {eval_after:.4f}{change}"
    elif losses:
        n = min(logging_steps, len(losses))
        first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
        what = f"training loss {first:.4f} -> {last:.4f} (first and last {n} steps; no eval split)"
    else:
        what = "no step completed"
    head = f"{what} in {seconds:.0f} s; adapter: {adapter}" + (f"; curve: {curve}" if curve else "")
    cli = "bash run.sh" if os.environ.get("SELFKD_RUN_SH") else "python selfkd.py"
    lines = [head + f"; load it with: {cli} generate --adapter {adapter} --prompts FILE",
             f"  evaluate it: {cli} evaluate --adapter {adapter};  merge it into the base: "
             f"{cli} export --adapter {adapter} --out DIR"]
    if losses and max(abs(x) for x in losses) == 0.0 and (eval_after in (None, 0.0)):
        lines.append("NOTHING WAS LEARNED: the loss was exactly 0 at every step, so the adapter is still the base "
                     "model (student == teacher; see the WARNING at the start for the fixes)")
    return lines


def write_curve_quietly(output_dir: str) -> str | None:
    """curve.png for the run so far; a failure to draw is reported, never fatal."""
    try:
        from curve import write_curve

        return write_curve(output_dir)
    except Exception as err:  # noqa: BLE001 - the run itself succeeded
        LOG(f"curve not written: {type(err).__name__}: {err}")
        return None


class MetricsSink:
    """Rank 0: one JSON row per step (and per eval) in metrics.jsonl, and TensorBoard scalars
    with --report_to tensorboard."""

    def __init__(self, cfg: Config, rank: int):
        self.path = os.path.join(cfg.output_dir, METRICS_FILE) if rank == 0 else None
        self.tb = None
        if rank == 0 and cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "runs"))

    def __call__(self, row: dict):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            step = row["step"]
            for key in ("loss", "jsd", "lr", "grad_norm", "tokens_per_s", "eval_jsd"):
                if key in row:
                    self.tb.add_scalar(("eval/" if key == "eval_jsd" else "train/") + key, row[key], step)
            if "branch" in row:
                self.tb.add_scalar(f"train/loss_{row['branch']}", row["loss"], step)
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


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
            json.dump(asdict(cfg), f, indent=2)
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

    def eval_jsd() -> float:
        return evaluate(engine, encoded_eval, cfg.per_device_eval_batch_size, tok.pad_id, cfg.beta,
                        cfg.temperature, device)

    eval_before = eval_after = eval_step = None
    if encoded_eval:
        eval_before = eval_after = eval_jsd()
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
                                      gather=cfg.gather_for_generation, media_inputs=media_inputs, media=media)

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
                m["eval_jsd"] = eval_after = eval_jsd()
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
        if (result is not None and (step + 1) % cfg.save_steps == 0) or step + 1 == total:  # always at the end
            last_save = save_checkpoint(engine, cfg.output_dir, step + 1, {"step": step + 1}, cfg.save_only_model,
                                        cfg.save_total_limit, log)
            saved_at = step + 1
        RUN.update(step=step + 1, last_save=last_save)
        if stop_requested(device):  # SIGTERM on any rank: all of them stop here, after a save
            if saved_at != step + 1:
                last_save = save_checkpoint(engine, cfg.output_dir, step + 1, {"step": step + 1},
                                            cfg.save_only_model, cfg.save_total_limit, log)
                RUN.update(last_save=last_save)
            log(f"selfkd: stopped by SIGTERM at step {step + 1} of {total}: saved {last_save}; resume with "
                "--resume_from_checkpoint latest", file=sys.stderr)
            if rank == 0:
                write_curve_quietly(cfg.output_dir)
            record.close()
            raise Stopped(143)
    if encoded_eval:
        if eval_step != total:  # the last step was skipped (non-finite)
            eval_after = eval_jsd()
        log(f"final eval JSD per token: {eval_after:.6f}")
    record.close()
    curve = write_curve_quietly(cfg.output_dir) if rank == 0 else None
    for line in run_summary(eval_before, eval_after, losses, time.time() - started, last_save, curve,
                            cfg.logging_steps):
        log(line)
    # tear the process group down explicitly: left to interpreter exit, its background threads
    # can abort the process ("terminate called without an active exception") after a good run
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return last_save


def check_writable(output_dir: str):
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"--output_dir {output_dir!r} is not writable: {err}") from err


# ----------------------------------------------------------------------------------------------
# 7. Commands: train (the default), launch, check, evaluate, generate, export, curve
# ----------------------------------------------------------------------------------------------

COMMANDS = {
    "train": "train on this process, or on every rank of torchrun / the deepspeed launcher (the default)",
    "launch": "check in one process, then train on --nproc_per_node N local processes (torchrun); exit "
              "codes and messages as for one process",
    "check": "validate flags, model directory and dataset and print the plan; start nothing (with "
             "--estimate_memory: the per-GPU memory plan for --nproc_per_node processes instead)",
    "evaluate": "eval JSD per token on a dataset's held-out split, of the base and of --adapter",
    "generate": "completions for the prompts in --prompts FILE, with --adapter (or the base without it)",
    "export": "merge --adapter into the base and write the released checkpoint layout to --out DIR",
    "curve": "write OUTPUT_DIR/curve.png from OUTPUT_DIR/metrics.jsonl (any run, also a running one)",
}
USAGE = """selfkd [train] [--flag value ...]
       selfkd --estimate_memory [--world_size N] [--flag value ...]
       selfkd launch [--nproc_per_node N] [--flag value ...]
       selfkd check [--nproc_per_node N] [--flag value ...]
       selfkd evaluate [--adapter CHECKPOINT] [--flag value ...]
       selfkd generate --prompts FILE [--adapter CHECKPOINT] [--max_new_tokens N] [--do_sample] [--out FILE.jsonl]
       selfkd export --adapter CHECKPOINT --out DIR [--torch_dtype bfloat16|float32]
       selfkd curve OUTPUT_DIR [--out FILE.png]"""
DESCRIPTION = ("GKD LoRA self-distillation (teacher = base model with LoRA off).\n\ncommands:\n"
               + "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items())
               + "\n\nevaluate, generate and export also take the training flags; with --adapter, every "
                 "flag not given defaults to\nthe value the adapter was trained with (<output_dir>/args.json). "
                 "--adapter takes a checkpoint directory or an\noutput directory (its newest checkpoint). "
                 "`selfkd COMMAND --help` lists a command's own flags.")

# the sub-commands' own flags: name -> argparse keywords
COMMAND_FLAGS = {
    "evaluate": {"--adapter": dict(help="checkpoint (or output directory) to evaluate; without it, only the base")},
    "generate": {
        "--adapter": dict(help="checkpoint (or output directory) whose adapter is on; without it, the base"),
        "--prompts": dict(required=True, help="a text file with one prompt per line, or a JSON/JSONL file of rows "
                                              "with 'prompt', alpaca 'instruction' (+ 'input', 'system') or "
                                              "'messages' (a final assistant turn is dropped)"),
        "--max_new_tokens": dict(type=int, default=None, help="tokens per completion; None: "
                                                              "--max_completion_length"),
        "--do_sample": dict(type=parse_bool, nargs="?", const=True, default=False, metavar="{true,false}",
                            help="sample with --temperature/--top_k/--top_p/--seed; false: greedy decoding"),
        "--out": dict(help="also write {prompt, completion, adapter} rows to this JSONL file"),
    },
    "export": {
        "--adapter": dict(required=True, help="checkpoint (or output directory) to merge into the base"),
        "--out": dict(required=True, help="new directory for the merged checkpoint (config.json records "
                                          "--torch_dtype, the dtype written)"),
    },
}
# training flags that describe where a run was, not what an adapter is: never taken from args.json
_NOT_INHERITED = ("resume_from_checkpoint", "overwrite_output_dir", "deepspeed", "output_dir", "report_to")


def resolve_adapter(path: str) -> str:
    """A checkpoint directory, or an output directory -> its newest complete checkpoint."""
    if os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        return path
    found = complete_checkpoints(path)
    if found:
        return found[-1][1]
    raise ConfigError(f"--adapter {path}: neither a checkpoint (no {ADAPTER_WEIGHTS}) nor an output directory "
                      "holding checkpoints")


def trained_with(adapter: str) -> dict:
    """The training flags of the run that wrote `adapter` (its output directory's args.json), or {}."""
    for where in (os.path.dirname(os.path.abspath(adapter)), adapter):
        path = os.path.join(where, ARGS_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                return {k: v for k, v in json.load(f).items() if k not in _NOT_INHERITED}
    return {}


def parse_command(command: str, argv: list[str]) -> tuple[Config, argparse.Namespace]:
    """A sub-command's flags: its own, plus the training flags, which default to the adapter's run."""
    usage = next(line.strip() for line in USAGE.splitlines() if f"selfkd {command}" in line)
    if "-h" in argv or "--help" in argv:  # the command's own flags; the training flags are in `selfkd --help`
        brief = _Parser(prog=f"selfkd {command}", usage=usage, description=f"{COMMANDS[command]}.",
                        formatter_class=_HelpFormatter, epilog=DESCRIPTION.split("\n\n")[2].replace(
                            " `selfkd COMMAND --help` lists a command's own flags.", " `selfkd --help` lists them."))
        for flag, kwargs in COMMAND_FLAGS[command].items():
            brief.add_argument(flag, **kwargs)
        brief.print_help()
        sys.exit(0)
    parser = _build_parser()
    parser.prog = f"selfkd {command}"
    for flag, kwargs in COMMAND_FLAGS[command].items():
        parser.add_argument(flag, **kwargs)
    names = [flag[2:] for flag in COMMAND_FLAGS[command]]
    given = _Parser(add_help=False)
    given.add_argument("--adapter")
    adapter = given.parse_known_args(argv)[0].adapter
    if adapter is not None:
        adapter = resolve_adapter(adapter)
        known = {f.name for f in fields(Config)}
        parser.set_defaults(**{k: v for k, v in trained_with(adapter).items() if k in known})
    namespace, extras = parser.parse_known_args(argv)
    if extras:
        raise ConfigError(_unknown_flags_message(extras, parser))
    values = vars(namespace)
    values.pop("local_rank")
    mine = argparse.Namespace(**{name: values.pop(name) for name in names})
    mine.adapter = adapter
    cfg = Config(**values)
    if command != "evaluate" and not cfg.dataset:
        cfg.dataset = ["(not used)"]
    _validate(cfg)
    if cfg.model is None:
        cfg.model = ensure_default_model()
    return cfg, mine


def adapter_layout(adapter: str, cfg: Config | None = None) -> dict:
    """Rank, alpha, targets and tower flags of an adapter: selfkd's extras (ADAPTER_EXTRAS beside
    adapter_config.json), else PEFT's own keys (an adapter PEFT wrote), the tower flags else the
    run's flags."""
    with open(os.path.join(adapter, ADAPTER_CONFIG)) as f:
        conf = json.load(f)
    extras_file = os.path.join(adapter, ADAPTER_EXTRAS)
    extra = {}
    if os.path.isfile(extras_file):
        with open(extras_file) as f:
            extra = json.load(f)
    targets = extra.get("targets")
    if not targets:
        text = conf.get("target_modules") or ""
        text = " ".join(text) if isinstance(text, list) else text
        targets = [t for t in ALL_TARGETS if t != "experts" and re.search(rf"\b{t}\b", text)]
        targets += ["experts"] if conf.get("target_parameters") else []
    return {"rank": int(conf["r"]), "alpha": float(conf["lora_alpha"]), "targets": ",".join(targets),
            "freeze_vit": extra.get("freeze_vit", cfg.freeze_vit if cfg else True),
            "freeze_aligner": extra.get("freeze_aligner", cfg.freeze_aligner if cfg else True)}


def attach_adapter(model: Thinker, adapter: str, layout: dict | None = None) -> None:
    """LoRA layers shaped as the adapter says, then its weights (PEFT layout)."""
    layout = layout or adapter_layout(adapter)
    inject_lora(model, rank=layout["rank"], alpha=layout["alpha"], dropout=0.0, targets=layout["targets"],
                freeze_vit=layout["freeze_vit"], freeze_aligner=layout["freeze_aligner"])
    load_adapter(model, adapter)


def load_model(cfg: Config, adapter: str | None, dtype, device) -> Thinker:
    """The base (with its towers when the adapter has LoRA in them), plus the adapter if given."""
    layout = adapter_layout(adapter, cfg) if adapter else None
    towers = layout is not None and not (layout["freeze_vit"] and layout["freeze_aligner"])
    model = load_thinker(cfg.model, dtype=dtype, device=device, towers=towers)
    if adapter:
        attach_adapter(model, adapter, layout)
    return model


def _device():
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class _PlainEngine:
    """evaluate() and gkd_loss_sums() take a DeepSpeed engine: a plain model behind its two uses."""

    def __init__(self, model):
        self.module = model

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def evaluate_command(argv: list[str]) -> None:
    cfg, own = parse_command("evaluate", argv)
    tok = load_tokenizer(cfg.model)
    train_rows, eval_rows, _ = load_dataset_specs(
        cfg.dataset, cfg.seed, cfg.split_dataset_ratio, teacher_system=cfg.teacher_system,
        teacher_sees_reference=cfg.teacher_sees_reference, skip_bad_rows=cfg.skip_bad_rows,
        teacher_sees_transcript=cfg.teacher_sees_transcript)
    rows, which = (eval_rows, "held-out") if eval_rows else (train_rows, "(--split_dataset_ratio 0: all)")
    encoded, _ = encode_examples(tok, rows, cfg.max_length, cfg.max_completion_length)
    device = _device()
    model = load_model(cfg, own.adapter, cfg.torch_dtype, device)
    if not torch.distributed.is_initialized():  # evaluate() sums over ranks: a group of one
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    engine = _PlainEngine(model)

    def jsd() -> float:
        return evaluate(engine, encoded, cfg.per_device_eval_batch_size, tok.pad_id, cfg.beta, cfg.temperature,
                        device)

    with lora_disabled(model):
        base = jsd()
    line = f"eval JSD per token on {len(encoded)} {which} rows of {' '.join(cfg.dataset)}: base {base:.6f}"
    if own.adapter:
        tuned = jsd()
        change = f" ({(tuned - base) / base:+.0%})" if base > 0 else ""
        line += f", adapter {tuned:.6f}{change} ({own.adapter})"
    print(line, flush=True)
    torch.distributed.destroy_process_group()


def read_prompts(path: str) -> list[list[dict]]:
    """Chat messages ending with a user turn, from a text file (one prompt per line) or JSON/JSONL
    rows: a string, {'prompt'}, alpaca {'instruction', 'input', 'system'} or {'messages'}."""
    if not os.path.isfile(path):
        raise ConfigError(f"--prompts {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith((".json", ".jsonl")):
        return [[{"role": "user", "content": line.strip()}] for line in text.splitlines() if line.strip()]
    try:
        rows = json.loads(text) if path.endswith(".json") else [json.loads(line) for line in text.splitlines()
                                                                   if line.strip()]
    except json.JSONDecodeError as err:
        raise ConfigError(f"--prompts {path}: malformed JSON: {err}") from err
    prompts = []
    for i, row in enumerate(rows, 1):
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict):
            raise ConfigError(f"--prompts {path}: row {i}: expected a string or an object")
        if isinstance(row.get("messages"), list):
            messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            if messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        else:
            user = row.get("prompt") or "\n".join(p for p in (row.get("instruction"), row.get("input")) if p)
            if not user:
                raise ConfigError(f"--prompts {path}: row {i}: no 'prompt', 'instruction' or 'messages'")
            messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + \
                [{"role": "user", "content": user}]
        prompts.append(messages)
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts in the file")
    return prompts


def generate_command(argv: list[str]) -> None:
    cfg, own = parse_command("generate", argv)
    prompts = read_prompts(own.prompts)
    tok = load_tokenizer(cfg.model)
    device = _device()
    model = load_model(cfg, own.adapter, cfg.torch_dtype, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    results = []
    for first in range(0, len(prompts), cfg.per_device_eval_batch_size):
        chunk = prompts[first:first + cfg.per_device_eval_batch_size]
        encoded = [tok.encode(render_chat(messages, add_generation_prompt=True)) for messages in chunk]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[tok.pad_id] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        completions, done = sample_completions(
            model, ids, mask, generator, max_new_tokens=own.max_new_tokens or cfg.max_completion_length,
            temperature=cfg.temperature if own.do_sample else 0.0, top_k=cfg.top_k, top_p=cfg.top_p,
            eos_ids=tok.eos_ids, pad_id=tok.pad_id, gather=False)
        for messages, row, n in zip(chunk, completions.tolist(), done.sum(1).tolist()):
            text = tok.decode(row[:n], skip_special_tokens=True)
            results.append({"prompt": messages, "completion": text, "completion_ids": row[:n], "adapter": own.adapter})
            shown = text if text.strip() else (f"(no text: the tokenizer has none for these {n} token ids: "
                                               f"{' '.join(map(str, row[:n]))})")
            print(f"### {len(results)}: {messages[-1]['content']}\n{shown}\n", flush=True)
    if own.out:
        with open(own.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        print(f"{len(results)} completions ({'adapter ' + own.adapter if own.adapter else 'base model'}) "
              f"written to {own.out}")


def record_dtype(path: str, dtype: torch.dtype) -> None:
    """config.json of an exported checkpoint names the dtype its tensors were written in."""
    name = str(dtype).removeprefix("torch.")

    def fix(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("torch_dtype", "dtype") and isinstance(value, str):
                    node[key] = name
                else:
                    fix(value)
        elif isinstance(node, list):
            for value in node:
                fix(value)

    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    fix(config)
    if "torch_dtype" not in config and "dtype" not in config:
        config["torch_dtype"] = name
    with open(file, "w") as f:
        json.dump(config, f, indent=2)


def export_command(argv: list[str]) -> None:
    cfg, own = parse_command("export", argv)
    if os.path.exists(own.out) and (not os.path.isdir(own.out) or os.listdir(own.out)):
        raise ConfigError(f"--out {own.out}: already exists and is not an empty directory; choose a new one")
    dtype = resolve_dtype(cfg.torch_dtype)
    model = load_model(cfg, own.adapter, dtype, "cpu")  # merged per tensor in fp32, written in dtype
    export_merged(model, own.out, dtype=dtype, base_path=cfg.model)
    record_dtype(own.out, dtype)
    size = sum(os.path.getsize(os.path.join(own.out, n)) for n in os.listdir(own.out)) / 2**30
    print(f"exported {own.out}: {cfg.model} + {own.adapter} merged, {str(dtype).removeprefix('torch.')}, "
          f"{size:.2f} GiB (transformers: Qwen3OmniMoeForConditionalGeneration.from_pretrained({own.out!r}); "
          f"selfkd: --model {own.out})", flush=True)


def curve_command(argv: list[str]) -> None:
    parser = _Parser(prog="selfkd curve", description=COMMANDS["curve"])
    parser.add_argument("output_dir")
    parser.add_argument("--out", help="the PNG to write (default: OUTPUT_DIR/curve.png)")
    args = parser.parse_args(argv)
    from curve import write_curve

    print(f"curve: {write_curve(args.output_dir, args.out)}")


def _nproc(argv: list[str]) -> tuple[int, list[str]]:
    parser = _Parser(add_help=False, allow_abbrev=False)
    parser.add_argument("--nproc_per_node", type=int, default=None)
    namespace, rest = parser.parse_known_args(argv)
    nproc = namespace.nproc_per_node or torch.cuda.device_count() or 2
    if nproc < 1:
        raise ConfigError(f"--nproc_per_node {nproc}: must be >= 1")
    return nproc, rest


def estimate_memory_command(cfg: Config, world: int | None = None) -> None:
    """--estimate_memory: the per-GPU memory plan (memory_plan.py) from config.json alone; starts nothing.
    Plans --world_size processes, else `world` (check's --nproc_per_node), $WORLD_SIZE, the local GPUs, 1."""
    if cfg.model is None:
        cfg.model = ensure_default_model()
    world = cfg.world_size or world or int(os.environ.get("WORLD_SIZE", 0)) or torch.cuda.device_count() or 1
    ds = deepspeed_config(cfg, resolve_dtype(cfg.torch_dtype), world_size=world)
    print(memory_plan.plan_for(cfg, ds, world, persistent_numel=ZERO3_PERSISTENT_NUMEL).table(), flush=True)


def check_command(argv: list[str]) -> None:
    nproc, rest = _nproc(argv)
    cfg = parse_args(rest)
    if cfg.estimate_memory:
        return estimate_memory_command(cfg, nproc)
    plan = plan_run(cfg, nproc)
    for line in data_report(cfg, plan):
        print(line)
    print(f"ok: model {cfg.model}, {plan.total} steps of {plan.per_step} rows on {nproc} processes "
          f"({plan.steps_per_epoch} steps per epoch)" + (f", resuming from {plan.resume_path}" if plan.resume_path
                                                          else ""))


def launch_command(argv: list[str]) -> None:
    """Check once here, then torchrun --standalone N ranks of `selfkd.py FLAGS` on this node.
    torchrun's own reports (its log lines, the ChildFailedError traceback) are left out: the
    ranks print selfkd's messages, and this process exits with the first failing rank's code
    (or 128 + the signal that stopped the launcher, after the ranks have handled it)."""
    nproc, rest = _nproc(argv)
    plan_run(parse_args(rest), nproc)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    # torchrun's own log lines: its loggers take their level from LOGLEVEL when created (the ranks
    # inherit the variable; there it only sets the level of torch's elastic and fx-pass loggers)
    os.environ.setdefault("LOGLEVEL", "CRITICAL")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args, run as torchrun

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)

    # after SIGTERM, time for the ranks to finish the step and save before they are killed
    timeout = int(os.environ.get("SELFKD_SHUTDOWN_TIMEOUT", "300"))
    # the ranks run the script this process runs: selfkd.py, or a script that calls selfkd.main()
    script = os.path.abspath(sys.argv[0] if sys.argv[0].endswith(".py") else __file__)
    args = torchrun_args(["--standalone", f"--nproc_per_node={nproc}", f"--shutdown_timeout={timeout}", script,
                          *rest])
    try:
        torchrun(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal no rank could report
            fail(f"rank {rank} was killed by {signal.Signals(-code).name}", code=128 - code)
        sys.exit(code)
    except SignalException as err:
        sys.exit(128 + int(err.sigval))


def _interrupted_message() -> str:
    if RUN["step"] is None:
        return "interrupted before training started; nothing was saved"
    where = (f"last complete checkpoint: {RUN['last_save']}; resume with --resume_from_checkpoint latest"
             if RUN["last_save"] else "no checkpoint saved yet, so nothing to resume from")
    return f"interrupted at step {RUN['step']}; {where}"


def _is_communication_error(err: BaseException) -> bool:
    return isinstance(err, getattr(torch.distributed, "DistError", ())) or (
        isinstance(err, RuntimeError) and any(w in str(err) for w in ("Gloo", "gloo", "NCCL", "Connection closed",
                                                                         "Connection reset", "peer")))


def _exit_after(err: BaseException) -> NoReturn:
    """The end of a rank that did not finish: one message from rank 0, the same exit code from
    every rank, no traceback unless the error is a bug."""
    _Signals.quiet = True
    try:
        time.sleep(0.1)  # a signal that is already on its way sets its flag now (it raises no more)
    except KeyboardInterrupt:
        pass
    message, code = None, 1
    if isinstance(err, Stopped):
        code = err.code
    elif _Signals.sigint or isinstance(err, KeyboardInterrupt):
        message, code = "selfkd: " + _interrupted_message(), 130
    elif isinstance(err, (ConfigError, DataError)):
        message, code = f"selfkd: error: {err}", 2
    elif isinstance(err, TrainingAborted):
        message = f"selfkd: error: {err}"
    elif _Signals.sigterm:
        message, code = (f"selfkd: stopped by SIGTERM at step {RUN['step']} before a checkpoint could be written "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); last complete "
                         f"checkpoint: {RUN['last_save'] or 'none'}"), 143
    elif _is_communication_error(err):
        message = (f"selfkd: error: lost contact with another rank ({str(err).splitlines()[0]}); last complete "
                   f"checkpoint: {RUN['last_save'] or 'none'}")
    elif isinstance(err, (FileNotFoundError, KeyError, ValueError, OSError)):  # bad model files or paths
        message, code = f"selfkd: error: {type(err).__name__}: {err}", 2
    else:  # a bug: every rank shows where
        traceback.print_exception(err)
    if message:
        LOG(message, file=sys.stderr)
    LOG.close()
    sys.stdout.flush()
    sys.stderr.flush()
    if torch.distributed.is_initialized():
        if isinstance(err, Stopped):  # every rank is here and healthy
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        else:  # a peer may be gone: leave without waiting for gloo / NCCL to notice
            os._exit(code)
    sys.exit(code)


def train_command(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if LOG.rank() != 0:  # rank 0 speaks for all (libraries print once per rank otherwise); errors stay on stderr
        sys.stdout = open(os.devnull, "w")
    try:
        cfg = parse_args(argv)
        if cfg.estimate_memory:
            estimate_memory_command(cfg)
        else:
            train(cfg)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - every way out is reported once, with one exit code
        _exit_after(err)
    LOG.close()


def main(argv: list[str] | None = None):
    """`selfkd [COMMAND] FLAGS`. Bad input ends with one line `selfkd: error: ...` and exit code
    2; a run that has to stop (non-finite steps, a failed save) with exit code 1; Ctrl-C with 130
    and SIGTERM (after a checkpoint) with 143. No traceback as the only message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    # DeepSpeed 0.19 calls collectives torch 2.13 has renamed; one warning per call floods the log
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)", category=FutureWarning)
    if command == "train":
        return train_command(argv)
    run = {"launch": launch_command, "check": check_command, "evaluate": evaluate_command,
           "generate": generate_command, "export": export_command, "curve": curve_command}[command]
    try:
        run(argv)
    except KeyboardInterrupt:
        print("selfkd: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ConfigError, DataError) as err:
        fail(str(err))
    except (FileNotFoundError, KeyError, ValueError, OSError) as err:  # bad model files or paths
        fail(f"{type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
