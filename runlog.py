"""What a run tells its user and where it is: the log (rank 0 speaks for all), the progress
line, metrics.jsonl (and TensorBoard), the closing lines, and the signals that stop a run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flags import Config


METRICS_FILE, LOG_FILE, CURVE_FILE, ARGS_FILE = "metrics.jsonl", "train.log", "curve.png", "args.json"
COMPLETIONS_FILE = "completions.jsonl"  # --log_completions


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
    held = False  # inside commit_uninterrupted: a Ctrl-C waits for the block's end


def _on_sigint(signum, frame):
    first = not _Signals.sigint
    _Signals.sigint = True
    if first and not _Signals.quiet and not _Signals.held:
        raise KeyboardInterrupt


@contextmanager
def commit_uninterrupted():
    """A Ctrl-C inside the block interrupts at its end, not in its middle: a checkpoint's commit
    (directory renamed into place, `latest`, RUN's record of it) is done whole, so the message on
    the way out never says "no checkpoint saved yet" of one that is complete on disk."""
    before, _Signals.held = _Signals.sigint, True
    try:
        yield
    finally:
        _Signals.held = False
    if _Signals.sigint and not before and not _Signals.quiet:
        raise KeyboardInterrupt


def _on_sigterm(signum, frame):
    _Signals.sigterm = True


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


def run_summary(eval_before, eval_after, losses: list[float], seconds: float, adapter: str, curve: str | None,
                logging_steps: int, cross_modal: bool = False) -> list[str]:
    """The last lines of a run: what changed, where everything is, what to do with it. cross_modal:
    every held-out student hears or sees media that its teacher reads as text, so the eval JSD is
    the cross-modal gap, and the headline says so."""
    if eval_before is not None and eval_after is not None:
        change = f" ({(eval_after - eval_before) / eval_before:+.0%})" if eval_before > 0 else ""
        what = (f"cross-modal gap (JSD, the student on the media vs the base on their text) {eval_before:.4f} -> "
                f"{eval_after:.4f}{change}" if cross_modal else f"eval JSD {eval_before:.4f} -> {eval_after:.4f}{change}")
    elif losses:
        n = min(logging_steps, len(losses))
        first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
        what = f"training loss {first:.4f} -> {last:.4f} (first and last {n} steps; no eval split)"
    else:
        what = "no step completed"
    head = f"{what} in {seconds:.0f} s; adapter: {adapter}" + (f"; curve: {curve}" if curve else "")
    cli = "bash run.sh" if os.environ.get("SELFKD_RUN_SH") else "python selfkd.py"
    per_modality = " (the gap per modality, and how the answers agree)" if cross_modal else ""
    lines = [head + f"; load it with: {cli} generate --adapter {adapter} --prompts FILE",
             f"  evaluate it: {cli} evaluate --adapter {adapter}{per_modality};  merge it into the base: "
             f"{cli} export --adapter {adapter} --out DIR"]
    if losses and max(abs(x) for x in losses) == 0.0 and (eval_after in (None, 0.0)):
        lines.append("NOTHING WAS LEARNED: the loss was exactly 0 at every step, so the adapter is still the base "
                     "model (student == teacher; see the WARNING at the start for the fixes)")
    return lines


def first_eval(output_dir: str, default: float | None) -> float | None:
    """The run's first eval JSD in metrics.jsonl (a resumed run keeps the rows before its resume
    point), else `default`."""
    try:
        with open(os.path.join(output_dir, METRICS_FILE)) as f:
            return next((row["eval_jsd"] for row in map(json.loads, f) if "eval_jsd" in row), default)
    except OSError:
        return default


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
