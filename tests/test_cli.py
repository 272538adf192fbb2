"""What a user meets through run.sh and the commands after training: one line and exit code 2 for
bad input through the launcher, Ctrl-C and SIGTERM, --help, the run's log / metrics / curve /
summary, evaluate / generate / export, and the data messages that say the fix. The launcher cases
run run.sh with 2 CPU processes (torchrun, gloo), as a user without a GPU does."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from commands import attach_adapter
from flags import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample_alpaca.jsonl")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", NPROC="2")


def run_sh(args, timeout=300, **env):
    return subprocess.run(["bash", "run.sh", *args], cwd=ROOT, env=dict(ENV, **env), capture_output=True, text=True,
                          timeout=timeout)


def selfkd(args, timeout=300, script="selfkd.py", **env):
    path = os.path.join(ROOT, script)
    return subprocess.run([sys.executable, path, *args], cwd=ROOT, env=dict(ENV, **env), capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(result, pattern, code=2):
    """Exit `code`, one `selfkd: error:` line matching `pattern`, nothing from the launcher."""
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("selfkd: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    for noise in ("Traceback", "ChildFailedError", "torch.distributed", "exitcode"):
        assert noise not in result.stderr, result.stderr[-3000:]


# the training flags of the runs below; MODEL=... makes run.sh start from the released model's configuration
SMALL = ["--dataset", f"{SAMPLE}#48", "--split_dataset_ratio", "0.1", "--torch_dtype", "float32",
         "--max_length", "128", "--max_completion_length", "8", "--per_device_train_batch_size", "2",
         "--per_device_eval_batch_size", "4", "--learning_rate", "3e-3", "--lmbda", "0.5",
         "--teacher_sees_reference", "true", "--seed", "1", "--save_only_model", "false", "--max_steps", "8",
         "--save_steps", "100", "--eval_steps", "4", "--logging_steps", "3", "--log_completions", "3"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# 1. --help, bad input, and errors found after the ranks started ---------------------------------


def test_help_is_printed_once_and_fast():
    started = time.time()
    result = run_sh(["--help"])
    assert result.returncode == 0 and result.stdout.count("usage: selfkd") == 1, result.stderr[-2000:]
    assert time.time() - started < 20  # no deepspeed import, no torchrun
    for command in ("launch", "check", "evaluate", "generate", "export", "curve"):
        assert f"selfkd {command}" in result.stdout
    assert "--report_to" in result.stdout and "--resume_from_checkpoint" in result.stdout
    own = run_sh(["generate", "--help"])
    assert own.returncode == 0 and "--prompts" in own.stdout and "--do_sample" in own.stdout


# flags and row counts are refused in-process by tests/test_reliability.py; through run.sh the default
# run keeps one model case and one data case
@pytest.mark.parametrize("case", ["missing model", pytest.param("unknown flag", marks=pytest.mark.slow),
                                  pytest.param("bad value", marks=pytest.mark.slow), "bad row",
                                  pytest.param("too few rows", marks=pytest.mark.slow)])
def test_bad_input_through_run_sh_is_one_line_and_exit_2(case, text_model_dir, tmp_path):
    """run.sh checks flags, model and data in one process before the 2 ranks start."""
    env, args = {"MODEL": text_model_dir}, ["--output_dir", str(tmp_path / "out")]
    if case == "missing model":
        env["MODEL"], pattern = str(tmp_path / "missing"), r"no config\.json at .*missing"
    elif case == "unknown flag":
        args, pattern = args + ["--lmbad", "0.5"], r"unknown flag --lmbad \(did you mean --lmbda"
    elif case == "bad value":
        args, pattern = args + ["--lmbda", "1.5"], r"--lmbda 1\.5: must be in \[0, 1\]"
    elif case == "bad row":
        (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
        env["DATASET"], pattern = str(tmp_path / "bad.jsonl"), r"bad\.jsonl:2: missing required field 'output'"
    else:
        rows = [json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) for i in range(5)]
        (tmp_path / "five.jsonl").write_text("\n".join(rows) + "\n")
        env["DATASET"] = str(tmp_path / "five.jsonl")
        pattern = (r"4 training rows cannot fill one step of 8 rows \(batch size 4 x 2 processes.*use a smaller "
                   r"--per_device_train_batch_size, fewer processes \(NPROC=1 bash run\.sh\), or more rows")
    started = time.time()
    one_line_error(run_sh(args, **env), pattern)
    assert time.time() - started < 60  # before any rank, deepspeed or model weights


def test_an_error_after_the_ranks_started_is_reported_once(text_model_dir, tmp_path):
    """A failed save (disk full on rank 0's second checkpoint) stops both ranks: one line, exit 1,
    no traceback from the ranks or the launcher."""
    out = str(tmp_path / "out")
    result = selfkd(["launch", "--nproc_per_node", "2", "--model", text_model_dir, *SMALL, "--max_steps", "3",
                     "--save_steps", "1", "--output_dir", out], script=os.path.join("tests", "faulty_selfkd.py"),
                    SELFKD_FAULT="enospc_during_save=2")
    one_line_error(result, r"writing checkpoint .*checkpoint-2.* failed: .*No space left on device", code=1)
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1"]


# 2./3. Ctrl-C and SIGTERM --------------------------------------------------------------------------


def start_run_sh(model_dir, out, *extra):
    return subprocess.Popen(["bash", "run.sh", *SMALL, "--output_dir", out, *extra], cwd=ROOT,
                            env=dict(ENV, MODEL=model_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(predicate, process, what, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended before {what}: " + process.communicate()[1][-3000:]
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def ranks_of(process):
    import psutil

    return [p for p in psutil.Process(process.pid).children(recursive=True) if "selfkd.py" in " ".join(p.cmdline())
            and p.environ().get("RANK") is not None]


@pytest.mark.parametrize("to", ["launcher", pytest.param("every rank", marks=pytest.mark.slow)])
def test_ctrl_c_prints_one_line_and_exits_130(to, text_model_dir, tmp_path):
    out = str(tmp_path / "out")
    run = start_run_sh(text_model_dir, out, "--max_steps", "400", "--save_steps", "2")
    try:
        wait_for(lambda: os.path.isfile(os.path.join(out, "checkpoint-2", "trainer_state.json")), run,
                 "the first checkpoint")
        if to == "launcher":  # what Ctrl-C in the terminal does: torchrun passes it on to the ranks
            os.kill(run.pid, signal.SIGINT)
        else:
            for rank in ranks_of(run):
                rank.send_signal(signal.SIGINT)
        signalled = time.time()
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, stderr[-3000:]
    assert time.time() - signalled < 60
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    step = int(re.fullmatch(r"selfkd: interrupted at step (\d+); last complete checkpoint: (.*); resume with "
                            r"--resume_from_checkpoint latest", lines[0]).group(1))
    assert step >= 2
    last = re.search(r"checkpoint: (.*);", lines[0]).group(1)
    assert os.path.isfile(os.path.join(last, "trainer_state.json"))
    assert open(os.path.join(out, "latest")).read().strip() == os.path.basename(last)
    assert "interrupted at step" in open(os.path.join(out, "train.log")).read()


@pytest.fixture(scope="module")
def trained(text_model_dir, tmp_path_factory):
    """One uninterrupted 8-step run through run.sh (2 processes): (output dir, stdout)."""
    out = str(tmp_path_factory.mktemp("trained") / "out")
    result = run_sh([*SMALL, "--output_dir", out], MODEL=text_model_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_sigterm_saves_at_the_next_step_and_resume_continues_exactly(trained, text_model_dir, tmp_path):
    """SIGTERM to one rank only: at the next step boundary both ranks agree, save, exit 143. The
    resumed run then logs the same losses as the uninterrupted one."""
    full, _ = trained
    out = str(tmp_path / "out")
    run = start_run_sh(text_model_dir, out)
    try:
        wait_for(lambda: os.path.isfile(os.path.join(out, "metrics.jsonl"))
                 and sum("loss" in row for row in metrics(out)) >= 2, run, "two steps")
        next(r for r in ranks_of(run) if r.environ()["RANK"] == "1").send_signal(signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 143, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
    stopped = re.search(r"selfkd: stopped by SIGTERM at step (\d+) of 8: saved (\S+); resume with "
                        r"--resume_from_checkpoint latest", stderr)
    assert stopped, stderr[-3000:]
    step, checkpoint = int(stopped.group(1)), stopped.group(2)
    assert 2 <= step < 8 and checkpoint == os.path.join(out, f"checkpoint-{step}")
    assert json.load(open(os.path.join(checkpoint, "trainer_state.json")))["step"] == step

    resumed = run_sh([*SMALL, "--output_dir", out, "--resume_from_checkpoint", "latest"], MODEL=text_model_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {step + 1} loss:" in resumed.stdout
    want = {m["step"]: m for m in metrics(full) if "loss" in m}
    got = {m["step"]: m for m in metrics(out) if "loss" in m}
    assert sorted(got) == list(range(1, 9))
    for s in range(1, 9):
        assert (got[s]["loss"], got[s]["branch"]) == (want[s]["loss"], want[s]["branch"]), s
    log = open(os.path.join(out, "train.log")).read()
    assert "stopped by SIGTERM" in log and "--- selfkd resumed run started" in log
    # the closing line compares with the run's first eval, not with the eval at the resume point
    first = next(json.loads(line)["eval_jsd"] for line in open(os.path.join(out, "metrics.jsonl")) if "eval_jsd" in line)
    assert re.search(rf"^eval JSD {first:.4f} -> \d\.\d{{4}} ", resumed.stdout, re.M), resumed.stdout[-1500:]


# 5./8./9./10. what a finished run leaves and says ----------------------------------------------------


def test_a_run_logs_every_step_and_ends_with_a_summary_and_a_curve(trained):
    out, stdout = trained
    rows = metrics(out)
    steps = [m for m in rows if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))  # every step, not every --logging_steps
    assert {m["branch"] for m in steps} == {"on-policy", "dataset"}
    assert all(f"loss_{m['branch']}" in m and m["elapsed_s"] > 0 for m in steps)
    assert [m["step"] for m in rows if "eval_jsd" in m] == [0, 4, 8]  # before training, every 4, at the end
    # progress lines every 3 steps, averaged over the window, with elapsed time and ETA
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert re.search(r"step 3/8  loss \d\.\d{5} \(avg of 3\)  lr .*  branch=\S.*  elapsed \d+:\d\d:\d\d  "
                     r"eta \d+:\d\d:\d\d", progress[0]), progress
    window = [m["loss"] for m in steps[:3]]
    assert f"loss {sum(window) / 3:.5f} (avg of 3)" in progress[0]
    before, after = rows[0]["eval_jsd"], rows[-1]["eval_jsd"]
    adapter = os.path.join(out, "checkpoint-8")
    summary = re.search(r"eval JSD (\d\.\d{4}) -> (\d\.\d{4}) \(([+-]\d+)%\) in \d+ s; adapter: (\S+); curve: (\S+); "
                        r"load it with: bash run\.sh generate --adapter (\S+) --prompts FILE", stdout)
    assert summary, stdout[-2000:]
    assert summary.group(1) == f"{before:.4f}" and summary.group(2) == f"{after:.4f}"
    assert int(summary.group(3)) == round(100 * (after - before) / before)
    assert summary.group(4) == adapter == summary.group(6)
    assert summary.group(5) == os.path.join(out, "curve.png")
    with open(os.path.join(out, "curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    log = open(os.path.join(out, "train.log")).read()  # what rank 0 printed, in the output directory
    assert "selfkd: GKD LoRA self-distillation" in log and summary.group(0) in log and progress[-1] in log
    args = json.load(open(os.path.join(out, "args.json")))  # JSON's own types
    assert (args["max_steps"], args["teacher_sees_transcript"], args["seq_kd"], args["save_total_limit"]) == \
        (8, False, False, 2)
    assert stdout.count("selfkd: GKD LoRA self-distillation") == 1  # rank 1 prints nothing
    # --log_completions 3: at every eval the 3 first held-out rows' answers, student's and teacher's (rank 0 has
    # rows 1-2, rank 1 row 3); the first of them in the log
    answers = [json.loads(line) for line in open(os.path.join(out, "completions.jsonl"))]
    assert [a["step"] for a in answers] == [0] * 3 + [4] * 3 + [8] * 3
    assert all(set(a) == {"step", "prompt", "reference", "student", "teacher"} and a["prompt"] for a in answers)
    assert answers[0]["prompt"] == answers[3]["prompt"] != answers[1]["prompt"]
    assert re.search(r"^answers at step 8: student '.*'; teacher '.*' \(all in completions\.jsonl\)$", stdout, re.M)


def test_curve_on_demand_for_any_output_dir(trained, tmp_path):
    out, _ = trained
    png = str(tmp_path / "c.png")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "curve.py"), out, "--out", png], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"curve: {png}", result.stderr
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    one_line_error(selfkd(["curve", str(tmp_path)]), r"no metrics\.jsonl in")


def test_report_to_tensorboard(text_model_dir, tmp_path):
    import selfkd as sk

    cfg = parse_args(["--model", text_model_dir, "--dataset", f"{SAMPLE}#16", "--split_dataset_ratio", "0",
                         "--max_length", "128", "--max_completion_length", "8", "--report_to", "tensorboard",
                         "--output_dir", str(tmp_path)])
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(sk.ConfigError, match=r"--report_to tensorboard: .*pip install tensorboard"):
            sk.plan_run(cfg, world=1)
        return
    sk.plan_run(cfg, world=1)
    sink = sk.MetricsSink(cfg, rank=0)
    sink({"step": 1, "loss": 0.5, "jsd": 0.5, "branch": "dataset", "lr": 1e-3})
    sink.close()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "runs"))


# 6. after training: evaluate, generate, export --------------------------------------------------------


def test_evaluate_reproduces_the_training_eval(trained):
    out, _ = trained
    rows = metrics(out)
    result = selfkd(["evaluate", "--adapter", out])  # an output directory: its newest checkpoint
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"eval JSD per token on 4 held-out rows of \S+: base (\d\.\d+), adapter (\d\.\d+) \([+-]\d+%\) "
                      r"\((\S+)\)", result.stdout)
    assert found, result.stdout
    assert float(found.group(1)) == pytest.approx(rows[0]["eval_jsd"], rel=1e-5)
    assert float(found.group(2)) == pytest.approx(rows[-1]["eval_jsd"], rel=1e-5)
    assert found.group(3) == os.path.join(out, "checkpoint-8")


def test_generate_with_the_adapter_on_and_off(trained, text_model_dir, tmp_path):
    out, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a colour.\n\nWhat is two plus two?\n")
    on = selfkd(["generate", "--adapter", out, "--prompts", str(prompts), "--max_new_tokens", "6",
                 "--out", str(tmp_path / "on.jsonl")])
    off = selfkd(["generate", "--model", text_model_dir, "--prompts", str(prompts), "--max_new_tokens", "6",
                  "--out", str(tmp_path / "off.jsonl")])
    for result, adapter in ((on, os.path.join(out, "checkpoint-8")), (off, None)):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "### 1: Name a colour." in result.stdout and "### 2: What is two plus two?" in result.stdout
        rows = [json.loads(line) for line in open(tmp_path / ("on.jsonl" if adapter else "off.jsonl"))]
        assert len(rows) == 2 and all(r["adapter"] == adapter and isinstance(r["completion"], str) for r in rows)
        assert rows[1]["prompt"] == [{"role": "user", "content": "What is two plus two?"}]
    one_line_error(selfkd(["generate", "--model", text_model_dir, "--prompts", str(tmp_path / "none.txt")]),
                   r"--prompts .*none\.txt: no such file")


def test_export_writes_the_dtype_it_records(trained, tmp_path):
    """The default export keeps the training dtype (float32 here) and gives the student's logits;
    --torch_dtype bfloat16 writes bf16 tensors and says bfloat16 in config.json."""
    from safetensors import safe_open

    from weights import load_thinker

    out, _ = trained
    adapter = os.path.join(out, "checkpoint-8")
    for dtype in ("float32", "bfloat16"):
        result = selfkd(["export", "--adapter", adapter, "--out", str(tmp_path / dtype)]
                        + (["--torch_dtype", dtype] if dtype == "bfloat16" else []))
        assert result.returncode == 0 and f"exported {tmp_path / dtype}" in result.stdout, result.stderr[-3000:]
        config = json.load(open(tmp_path / dtype / "config.json"))
        assert set(re.findall(r'"(?:torch_)?dtype": "(\w+)"', json.dumps(config))) == {dtype}  # at every level
        shard = next(n for n in os.listdir(tmp_path / dtype) if n.endswith(".safetensors"))
        with safe_open(str(tmp_path / dtype / shard), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    student = load_thinker(json.load(open(os.path.join(out, "args.json")))["model"], dtype=torch.float32)
    attach_adapter(student, adapter)
    merged = load_thinker(str(tmp_path / "float32"), dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = student(ids, mask)
        assert (merged(ids, mask) - want).abs().max() <= 1e-5 * want.abs().max()  # fp32 rounding of W + BA
    one_line_error(selfkd(["export", "--adapter", adapter, "--out", str(tmp_path / "float32")]),
                   r"--out .*float32: already exists")


def test_export_of_the_released_layout_loads_in_transformers_with_the_written_dtype(tmp_path):
    """A base in the released layout (audio and vision towers, transformers' config): the export
    carries the towers and its config makes transformers load the dtype actually written."""
    pytest.importorskip("transformers")
    from transformers import Qwen3OmniMoeForConditionalGeneration

    import selfkd as sk
    from hf_models import hf_full_model, left_padded_batch, tiny_config
    from lora import inject_lora, lora_parameters, save_adapter
    from weights import load_thinker

    cfg = tiny_config(num_hidden_layers=2)
    base = str(tmp_path / "base")
    hf_full_model(cfg, seed=3).save_pretrained(base)
    model = load_thinker(base, dtype=torch.float32)
    inject_lora(model, rank=4, alpha=8, targets="ALL", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if name.endswith("B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_adapter(model, str(tmp_path / "adapter"))
    ids, mask = left_padded_batch(cfg.vocab_size, [9, 6])
    with torch.no_grad():
        want = model.eval()(ids, mask)
    for dtype in ("float32", "bfloat16"):
        sk.main(["export", "--model", base, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / dtype),
                 "--torch_dtype", dtype])
        loaded = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(tmp_path / dtype), dtype="auto").thinker
        assert {p.dtype for p in loaded.parameters()} == {getattr(torch, dtype)}  # the towers too
        assert any("audio_tower" in name for name, _ in loaded.named_parameters())
        if dtype == "float32":
            with torch.no_grad():
                got = loaded.eval()(input_ids=ids, attention_mask=mask).logits
            assert (got - want)[mask.bool()].abs().max() <= 1e-5 * want.abs().max()


# 11./12. honest defaults and data messages that say the fix ------------------------------------------


def test_run_sh_takes_the_users_epochs_or_steps(text_model_dir, tmp_path):
    """The embedded default runs 40 steps unless the user chooses epochs or steps."""
    common = ["check", "--model", text_model_dir, "--output_dir", str(tmp_path / "out")]
    for extra, steps in (([], 40), (["--num_train_epochs", "1"], None), (["--max_steps=7"], 7)):
        result = run_sh(common + extra)
        assert result.returncode == 0, result.stderr[-2000:]
        found = re.search(r"ok: model \S+, (\d+) steps of 8 rows on 2 processes \((\d+) steps per epoch\)",
                          result.stdout)
        assert found, result.stdout
        assert int(found.group(1)) == (steps or int(found.group(2)))


def plan(model_dir, tmp_path, *flags):
    import selfkd as sk

    cfg = parse_args(["--model", model_dir, "--dataset", SAMPLE, "--teacher_sees_reference", "true",
                         "--output_dir", str(tmp_path / "out"), *flags])
    return cfg, sk.plan_run(cfg, world=2)


def test_a_teacher_prompt_that_cannot_fit_names_itself_and_the_tokens_it_needs(text_model_dir, tmp_path):
    from data import DataError

    with pytest.raises(DataError) as err:
        plan(text_model_dir, tmp_path, "--max_length", "48", "--max_completion_length", "16")
    message = str(err.value)
    assert re.search(r"no example fits max_length=48: all \d+ were skipped because the final user turn and the "
                     r"completion need \d+ to \d+ tokens \(the shortest: the teacher's final user turn \(with the "
                     r"reference answer that --teacher_sees_reference shows it: \d+ tokens\)\); raise --max_length "
                     r"to at least (\d+) \((\d+) keeps every row\)", message), message


def test_many_dropped_rows_are_counted_as_skipped_and_warned_about(text_model_dir, tmp_path):
    import selfkd as sk

    short = [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(6)]
    long_prompt = [{"instruction": "Repeat: " + "word " * 200, "output": "ok"} for _ in range(3)]
    long_answer = [{"instruction": "Count.", "output": " ".join(str(i) for i in range(60))}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in short + long_prompt + long_answer))
    common = ["--model", text_model_dir, "--dataset", str(path), "--split_dataset_ratio", "0",
              "--output_dir", str(tmp_path / "out")]
    cfg = parse_args(common + ["--max_length", "64", "--max_completion_length", "16"])
    lines = sk.data_report(cfg, sk.plan_run(cfg, world=1))
    assert "skipped: 3 (prompt does not fit --max_length 3); truncated: completion 1;" in lines[0], lines[0]
    assert "{" not in lines[0] and "Counter" not in lines[0]  # counts in words
    assert re.fullmatch(r"WARNING: 3 of 10 rows \(30%\) were skipped: the final user turn and the completion need "
                        r"(\d+) to (\d+) tokens, more than --max_length 64 \(e\.g\. \S+rows\.jsonl:7: the final user "
                        r"turn \(\d+ tokens\)\); --max_length \2 keeps every row", lines[1]), lines[1]
    assert lines[2] == ("WARNING: 1 of 7 rows (14%) had their completions cut to --max_completion_length 16 (a cut "
                        "completion has no end of turn); raise it to keep whole answers")
    cfg = parse_args(common + ["--max_length", "1024", "--max_completion_length", "512"])
    lines = sk.data_report(cfg, sk.plan_run(cfg, world=1))
    assert "skipped: none; truncated: none;" in lines[0] and lines[1:] == []  # nothing lost: no warning
