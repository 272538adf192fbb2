"""The trainer: the self-distillation fixed point, learning with teacher context, and the
whole job under DeepSpeed ZeRO-3 with 2 processes (gloo), including exact resume."""
import json
import os
import subprocess
import sys

import pytest
import torch

from chat import collate, encode_examples, load_tokenizer
from data import SAMPLE_DATASET, load_dataset_specs
from lora import inject_lora, lora_parameters
from weights import load_thinker
from selfkd import Config, gkd_loss_sums, is_on_policy, lr_at, sample_completions, step_branch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batches(model_dir, teacher_sees_reference, n=8, batch_size=4):
    """Batches of the sample data; without teacher_sees_reference only rows that carry no
    per-row teacher context, so teacher and student prompts are identical."""
    tok = load_tokenizer(model_dir)
    rows, _, _ = load_dataset_specs([str(SAMPLE_DATASET)], seed=0, split_ratio=0.0,
                                    teacher_sees_reference=teacher_sees_reference)
    if not teacher_sees_reference:
        rows = [r for r in rows if r.teacher_messages == r.student_messages]
    encoded, _ = encode_examples(tok, rows[:n * batch_size], max_length=192, max_completion_length=16)
    return tok, [collate(encoded[i:i + batch_size], tok.pad_id) for i in range(0, len(encoded), batch_size)]


def student(model_dir):
    model = load_thinker(model_dir, dtype=torch.float32)
    inject_lora(model, rank=8, alpha=16, dropout=0.05, targets="ALL", seed=0)
    return model.train()


def test_without_teacher_context_loss_and_every_gradient_are_exactly_zero(text_model_dir):
    """The self-distillation trap: teacher = base with LoRA off, student = base + LoRA with B = 0, same
    input. Then student == teacher, so the divergence and its gradient vanish."""
    cfg = Config(beta=0.5, temperature=2.0)
    model = student(text_model_dir)
    _, (batch, *_) = batches(text_model_dir, teacher_sees_reference=False)
    assert torch.equal(batch.teacher_prompt_ids, batch.student_prompt_ids)
    jsd, _, n = gkd_loss_sums(model, batch, batch.completion_ids, batch.completion_mask, cfg.beta, cfg.temperature,
                              with_sft=False)
    assert n > 0
    assert jsd.item() == 0.0
    jsd.backward()
    for name, p in lora_parameters(model):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


def test_with_teacher_context_the_divergence_goes_down(text_model_dir):
    """Teacher sees the reference answer; after a few dozen AdamW steps on the same data the
    student's divergence from it is clearly lower."""
    torch.manual_seed(0)
    cfg = Config(beta=0.5, temperature=2.0)
    model = student(text_model_dir)
    _, data = batches(text_model_dir, teacher_sees_reference=True, n=4)
    opt = torch.optim.AdamW([p for _, p in lora_parameters(model)], lr=3e-3)

    def mean_loss():
        with torch.no_grad():
            sums = [gkd_loss_sums(model.eval(), b, b.completion_ids, b.completion_mask, cfg.beta, cfg.temperature,
                                  False) for b in data]
        model.train()
        return sum(s[0].item() for s in sums) / sum(s[2] for s in sums)

    before = mean_loss()
    assert before > 1e-3
    for step in range(24):
        b = data[step % len(data)]
        jsd, _, n = gkd_loss_sums(model, b, b.completion_ids, b.completion_mask, cfg.beta, cfg.temperature, False)
        (jsd / n).backward()
        opt.step()
        opt.zero_grad()
    assert mean_loss() < 0.8 * before


def sampling(cfg, tok):
    return dict(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_k=cfg.top_k,
                top_p=cfg.top_p, eos_ids=tok.eos_ids, pad_id=tok.pad_id, gather=cfg.gather_for_generation)


def test_sampling_is_seeded_and_respects_max_length(text_model_dir):
    cfg = Config(temperature=2.0, top_k=50, top_p=0.95, max_completion_length=12, gather_for_generation=False)
    model = student(text_model_dir)
    tok, (batch, *_) = batches(text_model_dir, teacher_sees_reference=False)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return sample_completions(model, batch.student_prompt_ids, batch.student_prompt_mask, g, **sampling(cfg, tok))

    (a, am), (b, bm), (c, _) = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and torch.equal(am, bm)
    assert not torch.equal(a, c)
    assert a.shape[1] <= 12
    assert model.training  # sampling switched to eval and back


def test_teacher_sampling_is_the_base_model(text_model_dir):
    """--seq_kd samples with LoRA off: the same tokens as a model that never had LoRA."""
    from lora import lora_disabled

    cfg = Config(temperature=1.0, max_completion_length=8, gather_for_generation=False)
    model = student(text_model_dir)
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.add_(0.1)  # a trained-looking adapter
    base = load_thinker(text_model_dir, dtype=torch.float32)
    tok, (batch, *_) = batches(text_model_dir, teacher_sees_reference=False)
    args, kwargs = (batch.teacher_prompt_ids, batch.teacher_prompt_mask), sampling(cfg, tok)
    with lora_disabled(model):
        teacher = sample_completions(model, *args, torch.Generator().manual_seed(3), **kwargs)
    reference = sample_completions(base, *args, torch.Generator().manual_seed(3), **kwargs)
    student_draw = sample_completions(model, *args, torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(teacher[0], reference[0])
    assert not torch.equal(student_draw[0], reference[0])


def test_the_fixed_point_warning_and_step0_loss_are_printed(text_model_dir, tmp_path):
    """A dataset without teacher context, no --sft_alpha: the user is told, loudly, that nothing
    will be learned, and sees the step-0 loss of exactly 0."""
    import json as _json

    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(_json.dumps({"instruction": f"Add {i} and {i}.", "output": f"{2 * i}."}) + "\n"
                             for i in range(16)))
    out = run_selfkd(["--model", text_model_dir, "--dataset", str(plain), "--split_dataset_ratio", "0",
                      "--torch_dtype", "float32", "--max_length", "96", "--max_completion_length", "8",
                      "--per_device_train_batch_size", "2", "--lmbda", "0", "--max_steps", "1",
                      "--output_dir", str(tmp_path / "out")], nproc=1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING: the teacher sees exactly what the student sees" in out.stdout
    assert "step 1 loss: 0.000000" in out.stdout
    assert "NOTHING WAS LEARNED: the loss was exactly 0 at every step" in out.stdout  # said again at the end


def test_branch_draw_and_schedule():
    draws = [is_on_policy(s, 42, 0.5) for s in range(200)]
    assert draws == [is_on_policy(s, 42, 0.5) for s in range(200)]  # same on every rank
    assert 70 < sum(draws) < 130
    assert not any(is_on_policy(s, 42, 0.0) for s in range(50))
    assert all(is_on_policy(s, 42, 1.0) for s in range(50))
    assert {step_branch(s, 42, 0.5, seq_kd=True) for s in range(20)} == {"on-policy", "teacher-sampled"}
    assert {step_branch(s, 42, 0.5, seq_kd=False) for s in range(20)} == {"on-policy", "dataset"}
    lrs = [lr_at(s, 100, 1e-3, 0.1, "cosine") for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-5


def run_selfkd(args, nproc=2, timeout=600):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "selfkd.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(output_dir):
    """The per-step rows (metrics.jsonl also holds eval-only rows, e.g. the eval before step 1)."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "loss" in row]


@pytest.mark.slow
def test_two_process_zero3_end_to_end_and_exact_resume(text_model_dir, tmp_path):
    """2 processes, ZeRO-3, gloo: both branches, eval, checkpoints; then resuming from the
    step-3 checkpoint reproduces steps 4-6 and the final adapter of the uninterrupted run.
    (Slow: tests/test_cross_modal.py runs the same on the omni model with media rows.)"""
    common = ["--model", text_model_dir, "--dataset", f"{SAMPLE_DATASET}#64", "--split_dataset_ratio", "0.1",
              "--torch_dtype", "float32", "--max_length", "160", "--max_completion_length", "10",
              "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
              "--learning_rate", "3e-3", "--lmbda", "0.5", "--teacher_sees_reference", "true",
              "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3", "--logging_steps", "1",
              "--seed", "1", "--save_only_model", "false", "--lora_dropout", "0.1"]
    assert {is_on_policy(s, 1, 0.5) for s in range(6)} == {True, False}  # both branches are hit
    full = str(tmp_path / "full")
    out = run_selfkd(common + ["--output_dir", full])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Teacher model: base_model with LoRA disabled (frozen)" in out.stdout
    assert "step 1 loss:" in out.stdout and "adapter: " in out.stdout
    straight = metrics(full)
    assert [m["step"] for m in straight] == list(range(1, 7))
    assert {m["branch"] for m in straight} == {"on-policy", "dataset"}
    assert "eval_jsd" in straight[2] and "eval_jsd" in straight[5]
    assert all(m["loss"] > 0 for m in straight)
    assert sorted(os.listdir(full)) == ["args.json", "checkpoint-3", "checkpoint-6", "curve.png", "latest",
                                        "metrics.jsonl", "train.log"]

    resumed = str(tmp_path / "resumed")
    # generation without the one-time gather (per-module ZeRO-3 gathers) must sample the same tokens
    out = run_selfkd(common + ["--output_dir", resumed, "--resume_from_checkpoint", os.path.join(full, "checkpoint-3"),
                               "--gather_for_generation", "false"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_resumed_run_is_the_straight_run(full, resumed, resumed_from=3, last=6)


def assert_resumed_run_is_the_straight_run(full: str, resumed: str, resumed_from: int, last: int):
    """Steps after the checkpoint have the same losses and branches, and the final adapters are
    bit-identical."""
    from safetensors.torch import load_file

    straight, again = metrics(full), metrics(resumed)
    assert [m["step"] for m in again] == list(range(resumed_from + 1, last + 1))
    for a, b in zip(straight[resumed_from:], again):
        assert a["loss"] == b["loss"] and a["branch"] == b["branch"], (a, b)
    final_a, final_b = (load_file(os.path.join(d, f"checkpoint-{last}", "adapter_model.safetensors"))
                        for d in (full, resumed))
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        assert torch.equal(final_a[k], final_b[k]), k
