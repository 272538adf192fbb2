"""The command line: every training flag (ms-swift's spelling) as a field of Config, parsed and
checked before anything else runs, and the two errors a run can end with.

`parse_args(argv) -> Config` raises ConfigError naming the offending flag; `selfkd.py --help`
prints every flag with its default and help text (built from the fields below).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import NoReturn

from data import TEACHER_SEES_TRANSCRIPT


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
    compile_decode: str = _flag(
        "auto",
        "torch.compile the decode step of sampling (on a GPU with CUDA graphs): true | false | auto (on a "
        "GPU only: on CPU, compiling costs more than a short run saves). Same tokens either way",
        choices=("auto", "true", "false"),
    )
    estimate_memory: bool = _flag(
        False, "print what each GPU will hold, phase by phase (parameters, optimizer state, ZeRO-3's gathered "
        "weights, activations, loss, generation, checkpoint save), from config.json alone (no weights), and "
        "exit; the last line is 'peak per GPU: X GiB in <phase>'. `bash run.sh check --estimate_memory` plans "
        "the processes run.sh would start"
    )
    simulate_gpu: str | None = _flag(
        None, "run the training step on simulated GPUs of this kind (--world_size of them, and one) and exit: "
        "the CUDA path executed on tensors without data (config.json alone), memory measured by phase beside "
        "--estimate_memory's plan, kernel launches counted, step time and MFU estimated (simulate.py)",
        choices=("h100", "h200"), type=str
    )
    world_size: int | None = _flag(
        None, "processes (GPUs) --estimate_memory and --simulate_gpu plan for (None: $WORLD_SIZE, else the "
        "local GPUs, else 1; --simulate_gpu: else 8)",
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
    log_completions: int = _flag(
        0, "at every eval, the first N held-out rows' greedy answers, the student's (LoRA on) and the teacher's "
        "(LoRA off, its own prompt), with the reference: all in <output_dir>/completions.jsonl, the first in the log"
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


COMMANDS = {
    "train": "train on this process, or on every rank of torchrun / the deepspeed launcher (the default)",
    "launch": "check in one process, then train on --nproc_per_node N local processes (torchrun); exit "
              "codes and messages as for one process",
    "check": "validate flags, model directory and dataset and print the plan; start nothing (with "
             "--estimate_memory: the per-GPU memory plan for --nproc_per_node processes instead; with "
             "--simulate_gpu h100|h200: the step executed on that many simulated GPUs and on one)",
    "evaluate": "eval JSD per token on a dataset's held-out split, of the base and of --adapter",
    "generate": "completions for the prompts in --prompts FILE, with --adapter (or the base without it)",
    "export": "merge --adapter into the base and write the released checkpoint layout to --out DIR",
    "curve": "write OUTPUT_DIR/curve.png from OUTPUT_DIR/metrics.jsonl (any run, also a running one)",
}


USAGE = """selfkd [train] [--flag value ...]
       selfkd --estimate_memory [--world_size N] [--flag value ...]
       selfkd --simulate_gpu h100|h200 [--world_size N] [--flag value ...]
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
    _check(c.log_completions >= 0, "log_completions", c.log_completions, "must be >= 0 (0 = off)")
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


# Flags whose values are "true" / "false" or a word: JSON booleans in args.json, the word as a string.
_TRI_STATE = ("teacher_sees_transcript",)


def args_json(cfg: Config) -> dict:
    """The flags as args.json keeps them, with JSON's own types (true/false, numbers, null)."""
    values = asdict(cfg)
    for name in _TRI_STATE:
        values[name] = {"true": True, "false": False}.get(values[name], values[name])
    return values


def from_args_json(values: dict) -> dict:
    """args.json back to flag values (its booleans of the word-valued flags as the words)."""
    return {k: ({True: "true", False: "false"}.get(v, v) if k in _TRI_STATE else v) for k, v in values.items()}


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
