"""What a user sees when things go wrong: bad data, bad model directories, bad flags, a crash
mid-save, non-finite losses, a dead rank, a full disk. Input that is refused before training
runs selfkd.main in this process (the checks are the CLI's, without a Python start per case; one
case also runs as a real `python selfkd.py`, and tests/test_cli.py sends a few through run.sh);
everything after that is a real run of the CLI."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import selfkd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample_alpaca.jsonl")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def cli(args, fault=None, script="selfkd.py", timeout=300):
    env = dict(ENV, SELFKD_FAULT=fault or "")
    path = os.path.join(ROOT, script if script == "selfkd.py" else os.path.join("tests", script))
    return subprocess.run([sys.executable, path, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def in_process(args, capsys, monkeypatch):
    """selfkd.main(args) here, as the CLI: (exit code, stdout, stderr). Reaching the model setup
    fails the test: every refusal below must come before deepspeed, ranks or weights."""
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's handlers
    monkeypatch.setattr(selfkd._Signals, "quiet", False)
    for setup in ("init_distributed", "build_student"):
        monkeypatch.setattr(selfkd, setup, lambda *a, **k: pytest.fail("reached the training setup"))
    with pytest.raises(SystemExit) as exit:
        selfkd.main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit.value.code, out, err)


def small_run(model_dir, out_dir, *extra):
    return ["--model", model_dir, "--dataset", f"{SAMPLE}#24", "--split_dataset_ratio", "0",
            "--torch_dtype", "float32", "--max_length", "128", "--max_completion_length", "8",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--lmbda", "0",
            "--teacher_sees_reference", "true", "--logging_steps", "1", "--eval_steps", "1000",
            "--save_only_model", "false", "--output_dir", out_dir, *extra]


def one_line_error(result, pattern, code=2):
    """Exit `code`, a single `selfkd: error:` line matching `pattern`, and no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("selfkd: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in result.stderr


# 1. bad data ---------------------------------------------------------------------------------

BAD_DATA = {
    "truncated_json_array": (b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "out',
                             r"bad\.json:1: malformed JSON"),
    "truncated_jsonl_line": (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "outp\n',
                             r"bad\.jsonl:2"),
    "wrong_type": (b'{"instruction": "a", "output": "b"}\n{"instruction": 5, "output": "b"}\n',
                   r"bad\.jsonl:2.*instruction"),
    "missing_field": (b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"bad\.jsonl:2.*output"),
    "empty_completion": (b'{"instruction": "a", "output": ""}\n', r"bad\.jsonl:1.*empty"),
    "invalid_utf8": (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff\xfe", "output": "b"}\n',
                     r"bad\.jsonl.*byte (offset )?\d+"),
    "unknown_format": (b'{"question": "a", "answer": "b"}\n', r"bad\.jsonl:1.*format"),
    "empty_file": (b"", r"bad\.jsonl: the file is empty"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_with_file_and_line(case, text_model_dir, tmp_path, capsys, monkeypatch):
    content, pattern = BAD_DATA[case]
    path = tmp_path / ("bad.json" if case == "truncated_json_array" else "bad.jsonl")
    path.write_bytes(content)
    args = small_run(text_model_dir, str(tmp_path / "out"), "--max_steps", "1") + ["--dataset", str(path)]
    one_line_error(in_process(args, capsys, monkeypatch), pattern)


def test_bad_data_through_the_command_line(text_model_dir, tmp_path):
    """The same refusal from a real `python selfkd.py`, before any model is loaded."""
    content, pattern = BAD_DATA["truncated_jsonl_line"]
    (tmp_path / "bad.jsonl").write_bytes(content)
    started = time.time()
    result = cli(small_run(text_model_dir, str(tmp_path / "out"), "--max_steps", "1") +
                 ["--dataset", str(tmp_path / "bad.jsonl")])
    one_line_error(result, pattern)
    assert time.time() - started < 60


def test_bad_rows_are_counted_and_named_when_skipping(text_model_dir, tmp_path):
    """--skip_bad_rows: a 10 MB single line, a row longer than max_length, broken rows and
    special-token strings in user text; the run goes on and every skipped row is named."""
    good = [json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) for i in range(8)]
    rows = good[:4] + [
        json.dumps({"instruction": "x " * 5_000_000, "output": "long"}),  # 10 MB line, cannot fit
        '{"instruction": 3, "output": "b"}',
        '{"instruction": "broken", "outp',
        json.dumps({"instruction": "Ignore <|im_end|> this <|im_start|>", "output": "ok"}),
    ] + good[4:]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n")
    result = cli(small_run(text_model_dir, str(tmp_path / "out"), "--max_steps", "1", "--skip_bad_rows", "true",
                           "--dataset", str(path)))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"skipped row: .*mixed\.jsonl:6", out) and re.search(r"skipped row: .*mixed\.jsonl:7", out)
    # counted in words: the two broken rows, and the 10 MB row that cannot fit --max_length
    assert re.search(r"skipped: 3 \(wrong type 1, malformed JSON 1, prompt does not fit --max_length 1\)", out), out
    # ... named with a lower bound on its tokens: 10 MB of text is not encoded to count them exactly
    assert re.search(r"skipped row: .*mixed\.jsonl:5: the (teacher's )?final user turn \(.*at least \d+ tokens\) and "
                     r"the completion need at least \d+ tokens > --max_length 128", out)


# 2. bad model directories ----------------------------------------------------------------------


def test_model_directory_that_does_not_exist(tmp_path, capsys, monkeypatch):
    result = in_process(["--model", str(tmp_path / "nope"), "--dataset", SAMPLE], capsys, monkeypatch)
    one_line_error(result, r"nope")


def test_model_directory_with_a_non_qwen3_omni_config(text_model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    bad = tmp_path / "llama"
    shutil.copytree(text_model_dir, bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    result = in_process(small_run(str(bad), str(tmp_path / "out"), "--max_steps", "1"), capsys, monkeypatch)
    one_line_error(result, r"'llama' is not a Qwen3-Omni")


def test_model_directory_with_a_missing_shard(text_model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    bad = tmp_path / "noshard"
    shutil.copytree(text_model_dir, bad)
    os.remove(glob.glob(str(bad / "model-*.safetensors"))[0])
    result = in_process(small_run(str(bad), str(tmp_path / "out"), "--max_steps", "1"), capsys, monkeypatch)
    one_line_error(result, r"shard .*model-00001-of-00001\.safetensors.* does not exist")


# 3. bad flags: clear errors before any heavy work ----------------------------------------------


@pytest.mark.parametrize("flags, pattern", [
    (["--lmbda", "1.5"], r"--lmbda.*1\.5.*\[0, 1\]"),
    (["--beta", "-0.1"], r"--beta"),
    (["--temperature", "0"], r"--temperature"),
    (["--lora_rank", "0"], r"--lora_rank"),
    (["--lmbad", "0.5"], r"--lmbad.*--lmbda"),
    (["--teacher_model", "/some/other/model"], r"teacher.*LoRA"),
])
def test_bad_flags_fail_fast(flags, pattern, text_model_dir, capsys, monkeypatch):
    one_line_error(in_process(["--model", text_model_dir, "--dataset", SAMPLE, *flags], capsys, monkeypatch), pattern)


def test_unwritable_output_directory_fails_before_training(text_model_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = in_process(small_run(text_model_dir, str(blocker / "out"), "--max_steps", "1"), capsys, monkeypatch)
    one_line_error(result, r"--output_dir .* is not writable")


# 4. crash during a checkpoint save; save_total_limit -----------------------------------------


def test_sigkill_during_save_never_leaves_a_checkpoint_resume_would_pick(text_model_dir, tmp_path):
    out = str(tmp_path / "out")
    args = small_run(text_model_dir, out, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "1")
    killed = cli(args, fault="kill_during_save=2", script="faulty_selfkd.py")
    assert killed.returncode == -signal.SIGKILL
    assert os.path.isdir(os.path.join(out, ".tmp-checkpoint-4"))  # the half-written one...
    assert not os.path.exists(os.path.join(out, "checkpoint-4"))  # ...is never presented as complete
    assert open(os.path.join(out, "latest")).read().strip() == "checkpoint-2"
    resumed = cli(args + ["--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "checkpoint-2 at step 2" in resumed.stdout
    # save_total_limit 1 kept exactly the newest complete checkpoint; the debris is gone
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-4"]


def test_an_optimizer_file_for_other_parameter_names_is_refused_naming_it(text_model_dir, tmp_path):
    """A checkpoint whose optimizer state is keyed by other LoRA names (another layout, or the
    names before `.lora.` was the one scheme) is one clear error at resume, not a KeyError."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from lora import inject_lora, lora_parameters, save_adapter
    from weights import load_thinker

    model = load_thinker(text_model_dir, dtype=torch.float32)
    inject_lora(model, rank=4, alpha=8)
    checkpoint = tmp_path / "checkpoint-2"
    save_adapter(model, str(checkpoint))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "adam_steps": 2}))
    old = {f"{name.replace('.lora.', '.lora_')}.{key}": torch.zeros(1)
           for name, _ in lora_parameters(model) for key in ("fp32", "exp_avg", "exp_avg_sq")}
    save_file(old, str(checkpoint / "optimizer.safetensors"))
    with pytest.raises(selfkd.ConfigError, match=r"checkpoint-2/optimizer\.safetensors: no optimizer state for "
                                                 r"\S+\.lora\.\S+ \(\d+ tensors missing.*delete the file"):
        selfkd.load_checkpoint(SimpleNamespace(module=model), str(checkpoint), print)


# 6. non-finite losses ---------------------------------------------------------------------------


def test_non_finite_steps_are_skipped_and_logged(text_model_dir, tmp_path):
    out = str(tmp_path / "out")
    result = cli(small_run(text_model_dir, out, "--max_steps", "4", "--save_steps", "4",
                           "--max_nonfinite_steps", "3"), fault="nan_loss=2,3", script="faulty_selfkd.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: non-finite loss on some rank, step skipped (1 in a row" in result.stdout
    assert "step 3: non-finite loss on some rank, step skipped (2 in a row" in result.stdout
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 4]


def test_too_many_non_finite_steps_abort_without_saving(text_model_dir, tmp_path):
    out = str(tmp_path / "out")
    result = cli(small_run(text_model_dir, out, "--max_steps", "6", "--save_steps", "1",
                           "--max_nonfinite_steps", "2"), fault="nan_loss=2,3,4", script="faulty_selfkd.py")
    one_line_error(result, r"2 non-finite steps in a row; aborting.*checkpoint-1", code=1)
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1"]


# 7. a rank dies ----------------------------------------------------------------------------------


def test_a_dead_rank_ends_the_survivor_by_itself_and_keeps_the_last_checkpoint(text_model_dir, tmp_path):
    """The two ranks are started directly, without torchrun's agent (which would kill the survivor
    itself): when rank 1 dies, rank 0 must notice on its own, stop within seconds (well before
    --ddp_timeout) with one line naming the last complete checkpoint, and leave it intact."""
    import socket

    out = str(tmp_path / "out")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = small_run(text_model_dir, out, "--max_steps", "500", "--save_steps", "2", "--ddp_timeout", "600")
    ranks = []
    for rank in (0, 1):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        ranks.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "selfkd.py"), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 240
        while not os.path.isfile(os.path.join(out, "checkpoint-2", "trainer_state.json")):
            assert all(r.poll() is None for r in ranks) and time.time() < deadline, "no first checkpoint"
            time.sleep(0.3)
        ranks[1].kill()
        killed_at = time.time()
        _, stderr = ranks[0].communicate(timeout=120)
        assert time.time() - killed_at < 60
    finally:
        for r in ranks:
            if r.poll() is None:
                r.kill()
    assert ranks[0].returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("selfkd: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert re.search(r"lost contact with another rank .*last complete checkpoint: .*checkpoint-\d+$", errors[0])
    last = errors[0].rsplit(": ", 1)[1]
    from safetensors.torch import load_file

    assert json.load(open(os.path.join(last, "trainer_state.json")))["step"] >= 2
    assert load_file(os.path.join(last, "adapter_model.safetensors"))


# 8. disk full at save time -------------------------------------------------------------------


def test_a_rank_lost_right_after_a_save_names_that_checkpoint(text_model_dir, tmp_path):
    """Rank 0 has written checkpoint-2 completely when the collective that confirms it fails (a rank
    died just then): the message must name checkpoint-2, which resume would pick, not 'none'."""
    out = str(tmp_path / "out")
    result = cli(small_run(text_model_dir, out, "--max_steps", "4", "--save_steps", "2"),
                 fault="peer_lost_after_save=1", script="faulty_selfkd.py")
    one_line_error(result, r"lost contact with another rank .*last complete checkpoint: .*checkpoint-2$", code=1)
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "trainer_state.json"))


def test_disk_full_at_save_is_a_clear_error_and_keeps_older_checkpoints(text_model_dir, tmp_path):
    out = str(tmp_path / "out")
    result = cli(small_run(text_model_dir, out, "--max_steps", "3", "--save_steps", "1"),
                 fault="enospc_during_save=2", script="faulty_selfkd.py")
    one_line_error(result, r"writing checkpoint .*checkpoint-2.* failed: .*No space left on device.*"
                           r"Previous checkpoints .* are intact", code=1)
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1"]
    assert open(os.path.join(out, "latest")).read().strip() == "checkpoint-1"


def test_a_safetensors_error_at_save_reaches_every_rank_and_leaves_no_debris(text_model_dir, tmp_path):
    """safetensors raises its own SafetensorError (not an OSError) when serialisation fails: two
    ranks, both stop within seconds (not after --ddp_timeout), the temporary directory is gone and
    the older checkpoint is intact."""
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "faulty_selfkd.py"),
           *small_run(text_model_dir, out, "--max_steps", "3", "--save_steps", "1", "--ddp_timeout", "900")]
    started = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, SELFKD_FAULT="safetensors_error_during_save=2"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert time.time() - started < 240
    errors = [line for line in result.stderr.splitlines() if line.startswith("selfkd: error:")]
    assert errors and all(re.search(r"writing checkpoint .*checkpoint-2.* failed: SafetensorError.*"
                                    r"Previous checkpoints .* are intact", e) for e in errors), result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["args.json", "checkpoint-1", "latest", "metrics.jsonl", "train.log"]
    assert open(os.path.join(out, "latest")).read().strip() == "checkpoint-1"


def test_a_non_finite_last_step_still_saves_the_final_checkpoint(text_model_dir, tmp_path):
    out = str(tmp_path / "out")
    result = cli(small_run(text_model_dir, out, "--max_steps", "3", "--save_steps", "10"),
                 fault="nan_loss=3", script="faulty_selfkd.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: non-finite loss on some rank, step skipped" in result.stdout
    assert os.path.isfile(os.path.join(out, "checkpoint-3", "trainer_state.json"))
    assert f"adapter: {os.path.join(out, 'checkpoint-3')}" in result.stdout


def test_an_abort_after_resume_names_the_checkpoint_it_resumed_from(text_model_dir, tmp_path):
    out = str(tmp_path / "out")
    assert cli(small_run(text_model_dir, out, "--max_steps", "2", "--save_steps", "2")).returncode == 0
    result = cli(small_run(text_model_dir, out, "--max_steps", "6", "--save_steps", "10", "--max_nonfinite_steps", "2",
                           "--resume_from_checkpoint", "latest"), fault="nan_loss=3,4", script="faulty_selfkd.py")
    one_line_error(result, r"2 non-finite steps in a row; aborting\. Last complete checkpoint: .*checkpoint-2$",
                   code=1)


# 9. the output directory --------------------------------------------------------------------------


def test_a_second_run_into_the_same_output_dir_is_refused_unless_asked(text_model_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    for step in (1, 2):  # what a 2-step run saving every step leaves (a checkpoint is complete with its state file)
        os.makedirs(os.path.join(out, f"checkpoint-{step}"))
        with open(os.path.join(out, f"checkpoint-{step}", "trainer_state.json"), "w") as f:
            json.dump({"step": step, "adam_steps": step}, f)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": step, "loss": 0.1}) + "\n" for step in (1, 2))
    with open(os.path.join(out, "latest"), "w") as f:
        f.write("checkpoint-2\n")
    refused = in_process(small_run(text_model_dir, out, "--max_steps", "2"), capsys, monkeypatch)
    one_line_error(refused, r"--output_dir .* already holds checkpoints .*--resume_from_checkpoint latest.*"
                            r"--overwrite_output_dir true")
    again = cli(small_run(text_model_dir, out, "--max_steps", "1", "--overwrite_output_dir", "true"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1]
    assert json.load(open(os.path.join(out, "args.json")))["max_steps"] == 1


def test_a_resume_on_another_number_of_processes_keeps_the_rows_per_step(text_model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    """A checkpoint of a run of 8 rows per optimizer step (2 processes x batch 4): resumed on one
    process, gradient accumulation 2 keeps the 8 rows (and the plan says so); on 3 processes no
    accumulation makes 8: one line naming what would."""
    from flags import parse_args
    from plan import plan_run

    out = str(tmp_path / "out")
    checkpoint = os.path.join(out, "checkpoint-1")
    os.makedirs(checkpoint)
    with open(os.path.join(checkpoint, "trainer_state.json"), "w") as f:
        json.dump({"step": 1, "adam_steps": 1, "rows_per_step": 8}, f)
    flags = small_run(text_model_dir, out, "--per_device_train_batch_size", "4", "--resume_from_checkpoint", checkpoint)
    cfg = parse_args(flags)
    plan = plan_run(cfg, world=1)
    assert (cfg.gradient_accumulation_steps, plan.per_step) == (2, 8)
    assert plan.notes == ["resuming a run of 8 rows per optimizer step on 1 process x batch 4: gradient accumulation 2 "
                          "keeps it"]
    monkeypatch.setenv("WORLD_SIZE", "3")
    one_line_error(in_process(flags, capsys, monkeypatch),
                   r"--resume_from_checkpoint \S+checkpoint-1: that run took 8 rows per optimizer step, which 3 "
                   r"processes x --per_device_train_batch_size 4 cannot make with any --gradient_accumulation_steps; "
                   r"resume with NPROC=1 or 2 \(batch 4\)$")


def test_resume_from_an_older_checkpoint_drops_the_abandoned_run_and_keeps_what_it_writes(text_model_dir, tmp_path):
    """Checkpoints 1-4 exist; resuming from checkpoint-1 with --save_total_limit 2 abandons 2-4. The
    checkpoint the resumed run writes must survive rotation, and the metrics hold one history."""
    out = str(tmp_path / "out")
    assert cli(small_run(text_model_dir, out, "--max_steps", "4", "--save_steps", "1")).returncode == 0
    result = cli(small_run(text_model_dir, out, "--max_steps", "2", "--save_steps", "1", "--save_total_limit", "2",
                           "--resume_from_checkpoint", os.path.join(out, "checkpoint-1")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1", "checkpoint-2"]
    assert open(os.path.join(out, "latest")).read().strip() == "checkpoint-2"
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]


# 10. nothing is unpickled ---------------------------------------------------------------------


def test_no_pickle_anywhere_in_the_code():
    sources = [p for p in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))]
    assert len(sources) >= 4
    for path in sources:
        text = open(path).read()
        assert not re.search(r"\bimport pickle\b|\bpickle\.|\bcPickle\b|\bdill\b", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_ctrl_c_during_a_checkpoint_commit_interrupts_after_it(monkeypatch):
    """A Ctrl-C between the checkpoint directory's rename and RUN's record of it used to leave the
    way-out message saying "no checkpoint saved yet" of a complete one: it now waits for the commit."""
    from runlog import _on_sigint, _Signals, commit_uninterrupted

    for flag in ("sigint", "quiet", "held"):
        monkeypatch.setattr(_Signals, flag, False)
    previous = signal.signal(signal.SIGINT, _on_sigint)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with commit_uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler has run by now, and raised nothing
                done.append("the commit's last line")
        assert done == ["the commit's last line"] and _Signals.sigint and not _Signals.held
        with commit_uninterrupted():  # a block without a Ctrl-C of its own: nothing raised
            done.append("again")
    finally:
        signal.signal(signal.SIGINT, previous)
