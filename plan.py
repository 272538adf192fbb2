"""Before any rank starts: every check that needs no process group and no weights (model
directory, tokenizer, the whole dataset read and tokenized, step count, output directory), and
what the user is told about the data and about whether the run can learn at all.

The launcher (`selfkd launch`, run.sh) runs plan_run once in one process, so a bad input gives
one line and exit code 2 before any rank exists; each rank runs it again.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field

from checkpoints import STATE_FILE, refuse_output_dir, resolve_resume
from chat import TooLong, encode_examples, load_tokenizer
from data import load_dataset_specs
from flags import Config, ConfigError
from model_qwen3omni import ThinkerConfig, resolve_dtype
from runlog import LOG
from tiny import DEFAULT_MODEL_DIR, ensure_default_model


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
    notes: list[str] = field(default_factory=list)  # what the plan changed, for the log


def check_model_files(path: str) -> None:
    """Every shard the checkpoint lists is there and its header reads (no tensor is loaded)."""
    from safetensors import safe_open

    from weights import _shard_map

    for shard in sorted(set(_shard_map(path).values())):
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"shard {shard!r} is listed in the index but does not exist")
        try:
            with safe_open(shard, framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"shard {shard!r} cannot be read: {err}") from err


def check_writable(output_dir: str):
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"--output_dir {output_dir!r} is not writable: {err}") from err


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
    resume_step, notes = None, []
    if resume_path:
        with open(os.path.join(resume_path, STATE_FILE)) as f:
            state = json.load(f)
        resume_step = state["step"]
        if "rows_per_step" in state:  # older checkpoints do not say
            notes += keep_rows_per_step(cfg, world, resume_path, state["rows_per_step"])
    per_step = cfg.per_device_train_batch_size * world * cfg.gradient_accumulation_steps
    steps_per_epoch = len(encoded) // per_step
    if steps_per_epoch == 0:
        dropped = f" ({len(too_long)} rows did not fit --max_length {cfg.max_length})" if too_long else ""
        raise ConfigError(f"{len(encoded)} training rows{dropped} cannot fill one step of {per_step} rows "
                          f"(batch size {cfg.per_device_train_batch_size} x {world} processes x gradient "
                          f"accumulation {cfg.gradient_accumulation_steps}); use a smaller "
                          "--per_device_train_batch_size, fewer processes (NPROC=1 bash run.sh), or more rows")
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
    refuse_output_dir(cfg.output_dir, resume_step, cfg.overwrite_output_dir)
    if cfg.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"--report_to tensorboard: cannot import torch's SummaryWriter ({err}); "
                              "install it with `.venv/bin/pip install tensorboard`, or use --report_to none "
                              "(metrics.jsonl and curve.png are always written)") from err
    return RunPlan(tok, encoded, encoded_eval, data_stats, truncated, too_long, per_step, steps_per_epoch, total,
                   resume_path, resume_step, notes)


def keep_rows_per_step(cfg: Config, world: int, checkpoint: str, rows: int) -> list[str]:
    """A resumed run keeps the rows per optimizer step of the run it continues (its data order, its
    schedule and the scale of its loss are made for them), also on another number of processes:
    gradient accumulation takes up the difference where it divides, otherwise one error says what
    would. Sets cfg.gradient_accumulation_steps; returns the line for the log ([] if nothing changed)."""
    batch = cfg.per_device_train_batch_size
    if rows == batch * world * cfg.gradient_accumulation_steps:
        return []
    if rows % (batch * world):
        counts = [n for n in range(1, rows // batch + 1) if rows % (batch * n) == 0] if rows % batch == 0 else []
        options = [f"NPROC={' or '.join(map(str, counts))} (batch {batch})"] if counts else []
        if rows % world == 0:
            options.append(f"{world} processes with a --per_device_train_batch_size that divides {rows // world}")
        raise ConfigError(f"--resume_from_checkpoint {checkpoint}: that run took {rows} rows per optimizer step, which "
                          f"{world} processes x --per_device_train_batch_size {batch} cannot make with any "
                          f"--gradient_accumulation_steps; resume with {' or '.join(options) or 'other processes'}")
    cfg.gradient_accumulation_steps = rows // (batch * world)
    return [f"resuming a run of {rows} rows per optimizer step on {world} process{'es' if world > 1 else ''} x batch "
            f"{batch}: gradient accumulation {cfg.gradient_accumulation_steps} keeps it"]


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
