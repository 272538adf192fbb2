"""Checkpoints: the LoRA adapter (PEFT layout), optionally the AdamW state, and trainer_state.json.

Written to a temporary directory and renamed, so a crash never leaves a half-written checkpoint
that resume would pick; `trainer_state.json` is written last. Also the output directory's rules:
a directory holding another run's checkpoints is refused unless resuming or told to overwrite.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from flags import Config, ConfigError, TrainingAborted
from lora import adapter_tensors, load_adapter, lora_parameters, write_adapter
from runlog import COMPLETIONS_FILE, METRICS_FILE, RUN, commit_uninterrupted


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
            with commit_uninterrupted():
                if os.path.exists(final):  # a re-run of the same step replaces it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(output_dir)
                with open(os.path.join(output_dir, "latest.tmp"), "w") as f:
                    f.write(os.path.basename(final) + "\n")
                os.replace(os.path.join(output_dir, "latest.tmp"), os.path.join(output_dir, "latest"))
                # complete on disk: a failure in the collectives below, or a Ctrl-C held until here, must
                # name it, and the step it holds is done
                RUN.update(step=step, last_save=final)
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
    after k and the metrics (and completions) rows after k belong to the abandoned continuation of that run: drop
    them, so that they can neither be mixed with this run's nor rotated in place of its checkpoints."""
    refuse_output_dir(output_dir, resume_step, overwrite)
    found = complete_checkpoints(output_dir)
    newer = [path for step, path in found if resume_step is None or step > resume_step]
    for path in newer:
        shutil.rmtree(path)
    for name in (METRICS_FILE, COMPLETIONS_FILE):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                rows = [line for line in f if resume_step is not None and json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(rows)
    if (newer or resume_step is None) and os.path.exists(os.path.join(output_dir, "latest")):
        os.remove(os.path.join(output_dir, "latest"))
