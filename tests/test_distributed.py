"""Distributed correctness on CPU (gloo): ZeRO-2, ZeRO-3 and ZeRO-3 with offload train the same;
one process and two processes with the same global batch give the same LoRA gradients and update;
gradient accumulation 2 x batch 2 equals 1 x batch 4 (train_step divides by the global number of
completion tokens); resume continues exactly; ZeRO-3's fetch trace repeats from step to step.

Two launches of tests/dist_worker.py (1 process, 2 processes) on the compact text model compute
every run with selfkd.train_step (see the worker for what a run records); the tests compare them.
Tolerances are relative to each tensor's largest entry, ~30x the measured fp32 differences
(losses <= 1e-7, gradients <= 4e-6, weights after the update <= 3e-7)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from data import SAMPLE_DATASET
from selfkd import Config, deepspeed_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_RTOL, GRAD_RTOL, WEIGHT_RTOL = 1e-6, 1e-4, 1e-5


def launch(nproc: int, runs: str, model_dir: str, out: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "tests", "dist_worker.py"), model_dir, out, runs]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def runs(text_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    one = launch(1, "zero2_b4,zero2_b2_ga2,zero3_b4", text_model_dir, str(tmp / "one.pt"))
    two = launch(2, "zero2_b2,zero3_b2,offload_b2,zero2_b2+resume,offload_b2+resume", text_model_dir,
                 str(tmp / "two.pt"))
    return {**one, **two}


def assert_same_steps(a: list, b: list, steps, exact: bool = False):
    """Run a's steps equal run b's: loss, token count, full LoRA gradients and weights after the update."""
    for s in steps:
        x, y = a[s], b[s]
        assert x["tokens"] == y["tokens"] > 0, s
        loss_x, loss_y = x["jsd_sum"] / x["tokens"], y["jsd_sum"] / y["tokens"]
        for key, rtol in (("grads", GRAD_RTOL), ("weights", WEIGHT_RTOL)):
            assert x[key].keys() == y[key].keys()
            for name in x[key]:
                if exact:
                    assert torch.equal(x[key][name], y[key][name]), (s, key, name)
                else:
                    scale = float(y[key][name].abs().max())
                    assert scale > 0, (s, key, name)  # every LoRA tensor has a gradient and moves
                    diff = float((x[key][name] - y[key][name]).abs().max())
                    assert diff <= rtol * scale, (s, key, name, diff / scale)
        if exact:
            assert loss_x == loss_y, s
        else:
            assert loss_x == pytest.approx(loss_y, rel=LOSS_RTOL), s


def test_zero2_and_zero3_give_the_same_losses_and_updates_on_two_processes(runs):
    """Both branches: dataset steps 0-1 and an on-policy step 2 (the same seeded samples)."""
    assert_same_steps(runs["zero3_b2"], runs["zero2_b2"], steps=[0, 1, 2])


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_one_and_two_processes_give_the_same_lora_gradients_and_update(runs, stage):
    """Global batch 4: one process with batch 4, or two with batch 2 each (DeepSpeed averages the
    ranks' gradients; train_step scales each rank's loss by world / global tokens)."""
    assert_same_steps(runs[f"{stage}_b2"], runs[f"{stage}_b4"], steps=[0, 1])


def test_gradient_accumulation_two_by_two_equals_one_by_four(runs):
    """The same 4 rows as 2 micro-batches of 2: the loss of each is divided by the tokens of all 4,
    so the accumulated gradient is the batch-4 gradient (not the mean of two per-batch means)."""
    assert_same_steps(runs["zero2_b2_ga2"], runs["zero2_b4"], steps=[0, 1])


def test_zero3_offload_runs_and_trains_as_zero3(runs):
    assert_same_steps(runs["offload_b2"], runs["zero3_b2"], steps=[0, 1, 2])


@pytest.mark.parametrize("run", ["zero2_b2", "offload_b2"])
def test_resume_from_a_checkpoint_continues_exactly(runs, run):
    """Saved after step 1 (adapter + optimizer state, save_checkpoint), loaded into a fresh engine
    (load_checkpoint): step 2 (on-policy) gives bit-identical gradients and weights."""
    assert_same_steps(runs[f"{run}+resume"], runs[run], steps=[0, 1, 2], exact=True)


def test_zero3_fetch_trace_repeats_from_the_second_step(runs):
    """selfkd.zero3_new_step makes one optimizer step one DeepSpeed trace: recorded at step 0, complete
    (prefetching) from step 1, also on the on-policy step 2 (sampling keeps the record)."""
    for run in ("zero3_b2", "offload_b2", "zero3_b4"):
        assert [r["complete_trace"] for r in runs[run]] == [False, True, True][:len(runs[run])], run


@pytest.mark.slow
def test_zero3_fetch_trace_stays_complete_with_media_rows_in_both_branches(tiny_model_dir, tmp_path):
    """The omni model on the sample's audio rows, dataset and on-policy steps alternating: the frozen
    towers run before zero3_new_step in every branch, so each step's traced passes are the same and
    the trace is complete from the second step on (towers run for on-policy steps alone: never)."""
    rows = launch(2, "zero3_media_b2", tiny_model_dir, str(tmp_path / "media.pt"))["zero3_media_b2"]
    assert [r["complete_trace"] for r in rows] == [False, True, True, True]
    assert all(r["tokens"] > 0 and r["jsd_sum"] > 0 for r in rows)


def test_one_process_runs_the_zero3_preset_as_zero2(tmp_path):
    def stage(deepspeed, world):
        return deepspeed_config(Config(deepspeed=deepspeed), torch.float32, world_size=world)["zero_optimization"]

    assert stage("zero3", 1)["stage"] == 2  # one rank: nothing to partition
    assert stage("zero3", 2)["stage"] == 3 and stage("zero3", None)["stage"] == 3
    assert stage("zero3_offload", 1)["stage"] == 3  # its point: the weights in CPU memory
    assert stage("zero2", 1)["stage"] == stage("zero2", 8)["stage"] == 2
    assert stage("zero3", 8)["stage3_param_persistence_threshold"] == 0  # see deepspeed_config
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert stage(str(own), 1)["stage"] == 3  # a JSON file is taken as written


@pytest.mark.slow
def test_cli_zero2_two_processes_with_resume_and_zero3_offload_one_process(text_model_dir, tmp_path):
    """The trainer end to end: 2 processes under ZeRO-2 (both branches, eval, checkpoints), resumed from
    step 2 to the same adapter; one process with --deepspeed zero3 says it runs ZeRO-2 and gives the same
    losses as zero2; zero3_offload on one process (real ZeRO-3 with parameters and optimizer in CPU memory)."""
    from safetensors.torch import load_file
    from test_train import metrics, run_selfkd

    common = ["--model", text_model_dir, "--dataset", f"{SAMPLE_DATASET}#48", "--split_dataset_ratio", "0.1",
              "--torch_dtype", "float32", "--max_length", "128", "--max_completion_length", "8",
              "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--learning_rate", "3e-3",
              "--lmbda", "0.5", "--teacher_sees_reference", "true", "--max_steps", "4", "--save_steps", "2",
              "--eval_steps", "2", "--logging_steps", "1", "--seed", "1", "--save_only_model", "false"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    out = run_selfkd(common + ["--deepspeed", "zero2", "--output_dir", full])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ZeRO stage 2" in out.stdout
    assert {m["branch"] for m in metrics(full)} == {"on-policy", "dataset"}
    out = run_selfkd(common + ["--deepspeed", "zero2", "--output_dir", resumed, "--resume_from_checkpoint",
                               os.path.join(full, "checkpoint-2")])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [m["loss"] for m in metrics(resumed)] == [m["loss"] for m in metrics(full)][2:]
    a, b = (load_file(os.path.join(d, "checkpoint-4", "adapter_model.safetensors")) for d in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)

    losses = {}
    for preset in ("zero2", "zero3", "zero3_offload"):
        out_dir = str(tmp_path / preset)
        out = run_selfkd(common + ["--deepspeed", preset, "--output_dir", out_dir], nproc=1)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert ("runs as ZeRO-2" in out.stdout) == (preset == "zero3"), preset
        assert ("ZeRO stage 3" in out.stdout) == (preset == "zero3_offload"), preset
        losses[preset] = [m["loss"] for m in metrics(out_dir)]
    assert losses["zero3"] == losses["zero2"]  # the same engine
    assert losses["zero3_offload"] == pytest.approx(losses["zero2"], rel=1e-5)
