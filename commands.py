"""The commands around training: train (the default), launch, check, evaluate, generate, export,
curve; and `main`, which gives every way out one message and one exit code.

`python selfkd.py [COMMAND] FLAGS` lands in `main` here. evaluate, generate and export run in one
process on the trainer's own pieces (selfkd.evaluate, selfkd.sample_completions) and take an
adapter's training flags from its run's args.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import fields
from typing import NoReturn

import torch

import memory_plan
from chat import encode_examples, encode_prompt, load_tokenizer, media_inputs, reads_the_media
from checkpoints import complete_checkpoints
from data import DataError, _attach_media, _parse_row, load_dataset_specs
from flags import (COMMANDS, DESCRIPTION, USAGE, Config, ConfigError, TrainingAborted, _build_parser, _HelpFormatter,
                   _Parser, _unknown_flags_message, _validate, fail, from_args_json, parse_args,
                   parse_bool)
from lora import (ADAPTER_CONFIG, ADAPTER_EXTRAS, ADAPTER_WEIGHTS, ALL_TARGETS, export_merged, inject_lora, load_adapter,
                  lora_disabled)
from model_qwen3omni import Thinker, resolve_dtype
from plan import data_report, plan_run
from runlog import ARGS_FILE, LOG, RUN, Stopped, _on_sigint, _on_sigterm, _Signals
from selfkd import (ZERO3_PERSISTENT_NUMEL, answers, compiled_decode, deepspeed_config, evaluate, sample_completions,
                    train)
from tiny import ensure_default_model
from weights import load_thinker


# the sub-commands' own flags: name -> argparse keywords
COMMAND_FLAGS = {
    "evaluate": {"--adapter": dict(help="checkpoint (or output directory) to evaluate; without it, only the base")},
    "generate": {
        "--adapter": dict(help="checkpoint (or output directory) whose adapter is on; without it, the base"),
        "--prompts": dict(required=True, help="a text file with one prompt per line, or a JSON/JSONL file of rows "
                                              "with 'prompt', alpaca 'instruction' (+ 'input', 'system') or "
                                              "'messages' (a final assistant turn is dropped); with media as in "
                                              "datasets ('images' / 'audios' / 'videos' lists and tags, or content "
                                              "parts; paths relative to the file)"),
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
                return {k: v for k, v in from_args_json(json.load(f)).items() if k not in _NOT_INHERITED}
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


def load_model(cfg: Config, adapter: str | None, dtype, device, media: bool = False) -> Thinker:
    """The base, plus the adapter if given; with its towers when the inputs have media (`media`) or
    the adapter has LoRA in them."""
    layout = adapter_layout(adapter, cfg) if adapter else None
    towers = media or (layout is not None and not (layout["freeze_vit"] and layout["freeze_aligner"]))
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
    has_media = any(e.student_media or e.teacher_media for e in encoded)
    model = load_model(cfg, own.adapter, cfg.torch_dtype, device, media=has_media)
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
    for line in cross_modal_gap(engine, encoded, cfg, tok, device, own.adapter is not None):
        print(line, flush=True)
    torch.distributed.destroy_process_group()


def token_f1(a: list[int], b: list[int]) -> float:
    """SQuAD-style token F1 of two answers: the harmonic mean of precision and recall of their
    common tokens, counted with multiplicity (1.0 for two empty answers)."""
    common = sum((Counter(a) & Counter(b)).values())
    if not a or not b:
        return float(a == b)
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def cross_modal_gap(engine, encoded: list, cfg: Config, tok, device, with_adapter: bool) -> list[str]:
    """For rows whose student hears or sees media that the teacher reads as text (a teacher view:
    --teacher_sees_transcript, teacher_messages), per modality: the JSD between the student on the
    media and the teacher (the base, LoRA off) on their text, and the agreement of their greedy
    answers (exact match, token F1), for the base and for the adapter. What cross-modal
    distillation is for: the gap closes when the model answers from sound and pixels as it does
    from text."""
    model = engine.module
    views = [e for e in encoded if reads_the_media(e)]
    if not views:
        return []

    def greedy(ids, mask, media):
        return sample_completions(model, ids.to(device), mask.to(device), None, max_new_tokens=cfg.max_completion_length,
                                  temperature=0.0, top_k=0, top_p=1.0, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                                  gather=False, media_inputs=media and media.to(device))

    def answered(rows, side):  # greedy answers, a batch at a time, without the end of turn
        found = [a for first in range(0, len(rows), cfg.per_device_eval_batch_size)
                 for a in answers(rows[first:first + cfg.per_device_eval_batch_size], side, tok.pad_id, greedy)]
        return [[t for t in a if t not in tok.eos_ids] for a in found]

    lines = [f"cross-modal gap, {len(views)} rows with a teacher view (student on the media vs the base on their "
             f"text): JSD per token, then greedy answers' exact match and token F1, base" +
             (" -> adapter" if with_adapter else "")]
    for kind in ("audio", "image", "video"):
        rows = [e for e in views if any(m.kind == kind for m in e.student_media)]
        if not rows:
            continue
        with lora_disabled(model):  # the base's answers from the text: the same for the base and the adapter
            teacher = answered(rows, "teacher")
        figures = []
        for adapter_on in ([False, True] if with_adapter else [False]):
            with (nullcontext() if adapter_on else lora_disabled(model)):
                gap = evaluate(engine, rows, cfg.per_device_eval_batch_size, tok.pad_id, cfg.beta, cfg.temperature,
                               device)
                student = answered(rows, "student")
            exact = sum(s == t for s, t in zip(student, teacher)) / len(rows)
            f1 = sum(token_f1(s, t) for s, t in zip(student, teacher)) / len(rows)
            figures.append((gap, exact, f1))
        show = [" -> ".join(fmt.format(f[i]) for f in figures) for i, fmt in enumerate(("{:.4f}", "{:.0%}", "{:.2f}"))]
        lines.append(f"  {kind:<5} ({len(rows)} rows): JSD {show[0]}; exact match {show[1]}; token F1 {show[2]}")
    return lines


def read_prompts(path: str) -> list[tuple[list[dict], dict]]:
    """(chat messages ending with a user turn, their media items), from a text file (one prompt per
    line) or JSON/JSONL rows: a string, {'prompt'}, alpaca {'instruction', 'input', 'system'} or
    {'messages'}; rows with media take the dataset formats' forms (docs/data.md: `images` /
    `audios` / `videos` lists with tags, or content parts; paths relative to the file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--prompts {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith((".json", ".jsonl")):
        return [([{"role": "user", "content": line.strip()}], {}) for line in text.splitlines() if line.strip()]
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
        if has_media(row):
            prompts.append(media_prompt(row, f"{path}:{i}", os.path.dirname(path)))
            continue
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
        prompts.append((messages, {}))
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts in the file")
    return prompts


def has_media(row: dict) -> bool:
    """Whether a prompt row brings media: ms-swift's lists, or content parts of a media type."""
    parts = [part for m in row.get("messages") or [] if isinstance(m, dict) and isinstance(m.get("content"), list)
             for part in m["content"]]
    return any(row.get(key) for key in ("images", "audios", "videos")) or any(
        isinstance(part, dict) and part.get("type") in ("image", "audio", "video") for part in parts)


def media_prompt(row: dict, source: str, base_dir: str) -> tuple[list[dict], dict]:
    """(a prompt row's turns, their media items read and preprocessed), parsed as a dataset row is
    (the answer a dataset row needs is not asked for)."""
    row = dict(row)
    if isinstance(row.get("messages"), list) and (not row["messages"] or row["messages"][-1].get("role") != "assistant"):
        row["messages"] = [*row["messages"], {"role": "assistant", "content": "(the answer to generate)"}]
    elif "instruction" in row:
        row.setdefault("output", "(the answer to generate)")
    _, example = _parse_row(row, source, None, False, base_dir=base_dir)
    _attach_media(example, {})
    return example.student_messages, example.media


def generate_command(argv: list[str]) -> None:
    cfg, own = parse_command("generate", argv)
    prompts = read_prompts(own.prompts)
    tok = load_tokenizer(cfg.model)
    device = _device()
    model = load_model(cfg, own.adapter, cfg.torch_dtype, device, media=any(items for _, items in prompts))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    step = compiled_decode(model, cfg.compile_decode, device, lambda line: print(line, flush=True))
    results = []
    for first in range(0, len(prompts), cfg.per_device_eval_batch_size):
        chunk = prompts[first:first + cfg.per_device_eval_batch_size]
        encoded = [encode_prompt(tok, messages, items) for messages, items in chunk]  # (ids, media in order)
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.tensor([[tok.pad_id] * (width - len(e)) + e for e, _ in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e, _ in encoded], device=device)
        media = media_inputs([items for _, items in encoded])
        completions, done = sample_completions(
            model, ids, mask, generator, max_new_tokens=own.max_new_tokens or cfg.max_completion_length,
            temperature=cfg.temperature if own.do_sample else 0.0, top_k=cfg.top_k, top_p=cfg.top_p,
            eos_ids=tok.eos_ids, pad_id=tok.pad_id, gather=False, media_inputs=media and media.to(device), step=step)
        for (messages, _), row, n in zip(chunk, completions.tolist(), done.sum(1).tolist()):
            text = tok.readable(row[:n])  # ids the tokenizer lacks as <id>
            results.append({"prompt": messages, "completion": text, "completion_ids": row[:n], "adapter": own.adapter})
            shown = text
            asked = messages[-1]["content"]
            asked = asked if isinstance(asked, str) else " ".join(
                p["text"] if p["type"] == "text" else f"<{p['type']}>" for p in asked)
            print(f"### {len(results)}: {asked}\n{shown}\n", flush=True)
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
    dtype, towers = resolve_dtype(cfg.torch_dtype), None

    def plan(c: Config, n: int):
        nonlocal towers
        if towers is None:  # read the dataset files once
            towers = bool(memory_plan.dataset_has_media(c.dataset)) or not (c.freeze_vit and c.freeze_aligner)
        return memory_plan.plan_for(c, deepspeed_config(c, dtype, world_size=n), n, towers=towers,
                                    persistent_numel=ZERO3_PERSISTENT_NUMEL)

    print(memory_plan.fit_table(cfg, lambda c, n: plan(c, n).peak()[0] / memory_plan.GiB) + "\n", flush=True)
    print(plan(cfg, world).table(), flush=True)  # last: its 'peak per GPU' line


def simulate_command(cfg: Config, world: int | None = None) -> None:
    """--simulate_gpu: the training step on simulated GPUs (simulate.py), beside the memory plan."""
    import simulate

    if cfg.model is None:
        cfg.model = ensure_default_model()
    world = cfg.world_size or world or int(os.environ.get("WORLD_SIZE", 0)) or 8
    print(simulate.report(cfg, cfg.simulate_gpu, world, persistent_numel=ZERO3_PERSISTENT_NUMEL),
          flush=True)


def check_command(argv: list[str]) -> None:
    nproc, rest = _nproc(argv)
    cfg = parse_args(rest)
    if cfg.simulate_gpu:
        return simulate_command(cfg, nproc)
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
    script = os.path.abspath(sys.argv[0] if sys.argv[0].endswith(".py")
                             else os.path.join(os.path.dirname(__file__), "selfkd.py"))
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
        if cfg.simulate_gpu:
            simulate_command(cfg)
        elif cfg.estimate_memory:
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
