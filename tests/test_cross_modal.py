"""Cross-modal self-distillation: the student hears and sees the media, the teacher (the same
model, LoRA off) reads their transcripts and captions. On the embedded default (tiny towers).

- with the same media on both sides the divergence and every LoRA gradient are exactly 0;
- with the teacher reading the transcript, the held-out divergence falls;
- frozen towers run once per micro-batch when both prompts carry the same media, also in a
  step that samples (the sampling gets the step's tower outputs);
- 2 processes under ZeRO-3 with media rows in both branches, eval and checkpoints, and an
  exact resume.
"""
import json
import os
import re
from contextlib import nullcontext

import pytest
import torch

from chat import collate, encode_examples, load_tokenizer
from data import load_dataset_specs
from lora import inject_lora, lora_disabled, lora_parameters
from weights import load_thinker
from selfkd import gkd_loss_sums, sample_completions, tower_outputs, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OMNI = os.path.join(ROOT, "data", "sample_omni.jsonl")


def audio_batches(model_dir, transcript: str, batch_size=2):
    """The sample's audio-only rows (the student hears a clip), teacher context per `transcript`."""
    tok = load_tokenizer(model_dir)
    rows, _, _ = load_dataset_specs([OMNI], seed=0, split_ratio=0.0, teacher_sees_transcript=transcript)
    rows = [r for r in rows if {m.kind for m in r.media.values()} == {"audio"}]
    encoded, _ = encode_examples(tok, rows, max_length=512, max_completion_length=12)
    return [collate(encoded[i:i + batch_size], tok.pad_id) for i in range(0, len(encoded), batch_size)]


def student(model_dir):
    model = load_thinker(model_dir, dtype=torch.float32, towers=True)
    inject_lora(model, rank=8, alpha=16, dropout=0.0, targets="ALL", seed=0)
    return model.train()


def mean_jsd(model, batches):
    with torch.no_grad():
        sums = [gkd_loss_sums(model, b, b.completion_ids, b.completion_mask, 0.5, 2.0, False) for b in batches]
    return sum(s[0].item() for s in sums) / sum(s[2] for s in sums)


def test_same_media_on_both_sides_is_the_fixed_point(tiny_model_dir):
    model = student(tiny_model_dir)
    batches = audio_batches(tiny_model_dir, "false")
    assert len(batches) >= 2 and all(b.student_media is not None for b in batches)
    for b in batches:
        assert b.teacher_media is b.student_media  # collate shares one MediaInputs
        jsd, _, n = gkd_loss_sums(model, b, b.completion_ids, b.completion_mask, 0.5, 2.0, False)
        assert n > 0 and jsd.item() == 0.0
        jsd.backward()
    for name, p in lora_parameters(model):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


def test_frozen_towers_run_once_when_both_prompts_carry_the_same_media(tiny_model_dir, monkeypatch):
    model = student(tiny_model_dir)
    calls = []
    real = model.encode_media
    monkeypatch.setattr(model, "encode_media", lambda media: calls.append(media) or real(media))
    same = audio_batches(tiny_model_dir, "false")[0]
    teacher, student_media = tower_outputs(model, same)
    assert len(calls) == 1 and teacher is student_media
    calls.clear()
    differ = audio_batches(tiny_model_dir, "add")[0]  # the teacher's prompt adds text: same media, other ids
    assert differ.teacher_media is differ.student_media
    tower_outputs(model, differ)
    assert len(calls) == 1
    calls.clear()
    text_for_teacher = audio_batches(tiny_model_dir, "true")[0]  # the teacher reads instead of hearing
    assert text_for_teacher.teacher_media is None and text_for_teacher.student_media is not None
    tower_outputs(model, text_for_teacher)
    assert len(calls) == 2  # the teacher's (nothing) and the student's


class OneProcessEngine:
    """What train_step uses of a DeepSpeed engine, on one process without DeepSpeed."""

    def __init__(self, model):
        self.module, self.optimizer = model, torch.optim.SGD([p for _, p in lora_parameters(model)], lr=0.0)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()

    def get_global_grad_norm(self):
        return None


@pytest.mark.parametrize("branch, transcript", [("on-policy", "false"), ("on-policy", "true"),
                                                ("teacher-sampled", "false")])
def test_a_sampling_step_runs_the_frozen_towers_once_and_samples_as_they_would(tiny_model_dir, monkeypatch,
                                                                                branch, transcript):
    """train_step computes the tower outputs once and hands them to sampling: the towers run once
    per distinct media (not again in generation's prefill), and the tokens drawn are the tokens
    sampling draws when it runs the towers itself."""
    model = student(tiny_model_dir)
    with torch.no_grad():  # a student that differs from the teacher
        for name, p in lora_parameters(model):
            if name.endswith("B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    batch = audio_batches(tiny_model_dir, transcript)[0]
    tok = load_tokenizer(tiny_model_dir)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 1)
    calls, real = [], model.encode_media
    monkeypatch.setattr(model, "encode_media", lambda media: calls.append(media) or real(media))
    drawn = []

    def sample(prompt_ids, prompt_mask, media_inputs, media, run_towers=False):
        ids = sample_completions(model, prompt_ids, prompt_mask, torch.Generator().manual_seed(5), max_new_tokens=6,
                                 temperature=1.0, top_k=0, top_p=1.0, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                                 gather=False, media_inputs=media_inputs, media=None if run_towers else media)
        drawn.append((prompt_ids, prompt_mask, media_inputs, ids))
        return ids

    result = train_step(OneProcessEngine(model), [batch], branch, sample, 0.5, 2.0, 0.0, 0.0)
    assert result["sampled"] > 0 and result["jsd_sum"] > 0
    assert len(calls) == (1 if transcript == "false" else 2)  # teacher and student share one pass, or not
    (prompt_ids, prompt_mask, media_inputs, (ids, mask)), = drawn
    context = lora_disabled(model) if branch == "teacher-sampled" else nullcontext()
    with context:
        again, again_mask = sample(prompt_ids, prompt_mask, media_inputs, None, run_towers=True)
    assert torch.equal(ids, again) and torch.equal(mask, again_mask)


def test_the_student_learns_to_answer_from_sound_as_the_teacher_does_from_text(tiny_model_dir):
    torch.manual_seed(0)
    model = student(tiny_model_dir)
    batches = audio_batches(tiny_model_dir, "true")
    assert all(b.teacher_media is None and b.student_media is not None for b in batches)
    held_out, train = batches[:1], batches[1:]
    before = mean_jsd(model.eval(), held_out)
    model.train()
    assert before > 1e-3
    opt = torch.optim.AdamW([p for _, p in lora_parameters(model)], lr=3e-3)
    for step in range(24):
        b = train[step % len(train)]
        jsd, _, n = gkd_loss_sums(model, b, b.completion_ids, b.completion_mask, 0.5, 2.0, False)
        (jsd / n).backward()
        opt.step()
        opt.zero_grad()
    after = mean_jsd(model.eval(), held_out)
    assert after < 0.8 * before, (before, after)


def test_two_process_zero3_with_media_rows_both_branches_and_exact_resume(tiny_model_dir, tmp_path):
    """Each rank's rows carry other media (or none) every step; both branches, eval, checkpoints;
    resuming from step 2 reproduces steps 3-4 and the final adapter."""
    from selfkd import is_on_policy
    from test_train import assert_resumed_run_is_the_straight_run, metrics, run_selfkd

    common = ["--model", tiny_model_dir, "--dataset", OMNI, "--split_dataset_ratio", "0.2", "--torch_dtype",
              "float32", "--max_length", "1024", "--max_completion_length", "6", "--per_device_train_batch_size", "2",
              "--per_device_eval_batch_size", "2", "--learning_rate", "3e-3", "--lmbda", "0.5",
              "--teacher_sees_transcript", "true", "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2",
              "--logging_steps", "1", "--seed", "3", "--save_only_model", "false", "--lora_dropout", "0.1"]
    assert {is_on_policy(s, 3, 0.5) for s in range(4)} == {True, False}
    full = str(tmp_path / "full")
    out = run_selfkd(common + ["--output_dir", full])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "audio and vision towers" in out.stdout
    # every held-out student hears or sees what its teacher reads: the headline is the cross-modal gap
    assert re.search(r"^cross-modal gap \(JSD, the student on the media vs the base on their text\) \d\.\d{4} -> "
                     r"\d\.\d{4} \([+-]\d+%\) in \d+ s; adapter: ", out.stdout, re.M), out.stdout[-2000:]
    straight = metrics(full)
    assert [m["step"] for m in straight] == [1, 2, 3, 4]
    assert {m["branch"] for m in straight} == {"on-policy", "dataset"}
    assert all(m["loss"] > 0 for m in straight)
    # the README's command after `DEMO=omni bash run.sh`: evaluate loads the towers for the media rows
    from test_cli import run_sh

    evaluated = run_sh(["evaluate", "--adapter", full])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    found = re.search(r"base (\d\.\d+), adapter (\d\.\d+)", evaluated.stdout)
    assert found, evaluated.stdout
    evals = [m["eval_jsd"] for m in json_rows(full) if "eval_jsd" in m]
    assert float(found.group(1)) == pytest.approx(evals[0], rel=1e-5)
    assert float(found.group(2)) == pytest.approx(evals[-1], rel=1e-5)
    # and the cross-modal gap per modality: the student on the media vs the base on their text
    gap = evaluated.stdout.splitlines()[1:]
    assert gap[0].startswith("cross-modal gap, 4 rows with a teacher view"), evaluated.stdout
    kinds = [re.fullmatch(r"  (audio|image|video) *\((\d) rows\): JSD (\d\.\d{4}) -> (\d\.\d{4}); exact match \d+% -> "
                          r"\d+%; token F1 \d\.\d\d -> \d\.\d\d", line) for line in gap[1:]]
    assert kinds and all(kinds) and all(float(k.group(3)) > 0 and float(k.group(4)) > 0 for k in kinds), gap
    # generate with media prompts (dataset forms, paths relative to the file): what the trainer's
    # own encoding and greedy sampling give for the same rows with the adapter on
    rows = [{"messages": [{"role": "user", "content": "<image>What shape is in the picture?"}],
             "images": ["omni/red_circle.png"]},
            {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "omni/shapes.flac"},
                                                       {"type": "text", "text": "What was said?"}]}]}]
    prompts = os.path.join(ROOT, "data", f".prompts-{os.getpid()}.jsonl")  # beside data/omni
    try:
        with open(prompts, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        made = run_sh(["generate", "--adapter", full, "--prompts", prompts, "--out", str(tmp_path / "gen.jsonl")])
    finally:
        os.remove(prompts)
    assert made.returncode == 0, made.stderr[-3000:]
    made_rows = [json.loads(line) for line in open(tmp_path / "gen.jsonl")]
    got = [r["completion_ids"] for r in made_rows]
    assert "### 1: <image> What shape is in the picture?" in made.stdout and "### 2: <audio> What was said?" in made.stdout
    # the embedded default's tokenizer has text for every id: the completions print as words, no <id>
    tok = load_tokenizer(tiny_model_dir)
    for r in made_rows:
        assert r["completion"] and all(tok.tokenizer.id_to_token(i) is not None for i in r["completion_ids"]), r
        assert r["completion"] == tok.decode(r["completion_ids"], skip_special_tokens=True) in made.stdout
    for row in rows:
        row["messages"] = row["messages"] + [{"role": "assistant", "content": "x"}]
    with open(tmp_path / "as_data.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.symlink(os.path.join(ROOT, "data", "omni"), tmp_path / "omni")
    examples, _, _ = load_dataset_specs([str(tmp_path / "as_data.jsonl")], seed=0, split_ratio=0.0)
    examples.sort(key=lambda e: e.source)
    from commands import attach_adapter

    model = load_thinker(tiny_model_dir, dtype=torch.float32, towers=True)
    attach_adapter(model, os.path.join(full, "checkpoint-4"))  # its rank, alpha and targets
    for example, want in zip(examples, got):
        batch = collate(encode_examples(tok, [example], 1024, 8)[0], tok.pad_id)
        ids, mask = sample_completions(model, batch.student_prompt_ids, batch.student_prompt_mask, None,
                                       max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0, eos_ids=tok.eos_ids,
                                       pad_id=tok.pad_id, gather=False, media_inputs=batch.student_media)
        assert ids[0, :int(mask.sum())].tolist() == want, example.source

    resumed = str(tmp_path / "resumed")
    # generation without the one-time gather (per-module ZeRO-3 gathers) must sample the same tokens
    out = run_selfkd(common + ["--output_dir", resumed, "--resume_from_checkpoint",
                               os.path.join(full, "checkpoint-2"), "--gather_for_generation", "false"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_resumed_run_is_the_straight_run(full, resumed, resumed_from=2, last=4)


def test_token_f1_is_squads():
    from commands import token_f1

    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0 and token_f1([1, 2], [3]) == 0.0 and token_f1([], []) == 1.0
    assert token_f1([1, 1, 2], [1, 2, 2, 5]) == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))  # multiplicity
    assert token_f1([], [4]) == 0.0


def json_rows(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sampling_never_emits_a_media_placeholder(tiny_model_dir):
    """A placeholder in a completion would meet no tower output in the loss's forward; even a model
    that prefers them (here: their lm_head rows boosted) samples something else."""
    from selfkd import sample_completions
    from tiny import QWEN_TOKEN_IDS

    model = load_thinker(tiny_model_dir, dtype=torch.float32)
    pads = [QWEN_TOKEN_IDS[t] for t in ("<|image_pad|>", "<|audio_pad|>", "<|video_pad|>")]
    with torch.no_grad():
        model.lm_head.weight[pads] *= 50.0
    tok = load_tokenizer(tiny_model_dir)
    ids = torch.tensor([tok.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")])
    plain = model.lm_head(model(ids, return_hidden=True)[:, -1])
    assert plain.argmax(-1).item() in pads  # the boosted model would pick one
    for temperature in (0.0, 2.0):
        out, _ = sample_completions(model, ids, torch.ones_like(ids), torch.Generator().manual_seed(0),
                                    max_new_tokens=8, temperature=temperature, top_k=0, top_p=1.0,
                                    eos_ids=tok.eos_ids, pad_id=tok.pad_id, gather=False)
        assert not torch.isin(out, torch.tensor(pads)).any(), out
