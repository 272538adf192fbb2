"""data.py: tokenizer and chat format against transformers, datasets, truncation, batches, bad input."""
import json
import os
import unicodedata
from collections import Counter

import pytest
import torch

from chat import EncodedExample, collate, encode_example, encode_examples, join_prompt_completion, labels_for, load_tokenizer, render_chat
from data import DataError, Example, REFERENCE_WRAPPER, SAMPLE_DATASET, load_dataset_specs

# Text that exercises every branch of the Qwen split regex, NFC, byte-level BPE and the
# added-token matcher.
CORPUS = [
    "Hello world",
    "你好，世界！今天天气很好。",
    "emoji 😀👍🏽 and a flag 🇨🇳",
    "a   b\n\n\n  c\t\td  ",
    "   leading spaces and trailing   ",
    "\r\nwindows\r\nlines\r\n",
    "12345 67.89 1,000,000",
    "def f(x):\n    return x ** 2  # square\n",
    "I'm sure they'll say we've DONE it",
    "e\u0301cole, ÀÉÎ, straße",  # decomposed accent: NFC composes it
    "hi<|im_end|>there<|im_start|>user\nsneaky",
    "<think>\nreasoning\n</think>\n\nanswer",
    "<|endoftext|><|audio_start|><|audio_pad|><|audio_end|>",
    "<|vision_start|><|image_pad|><|vision_end|><|video_pad|>",
    "",
]

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is 2 + 2?"}],
    "system_and_user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "法国的首都是哪里？"}],
    "multi_turn_no_system": [
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello!\n\nHow can I help?"},
        {"role": "user", "content": "Write code:\n    x = 1\n"},
    ],
    "multi_turn_system_ends_with_assistant": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "1 + 1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "text with <|im_end|> inside"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nok"},
    ],
}


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    from transformers import AutoTokenizer  # test-only dependency

    return AutoTokenizer.from_pretrained(str(tiny_dir))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def alpaca_rows(n):
    return [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(n)]


def row_ids(examples):
    """Which row (by line) each example came from."""
    return [int(e.source.rsplit(":", 1)[1]) for e in examples]


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat format against transformers
# ---------------------------------------------------------------------------------------------


def test_transformers_loads_it_as_qwen2_tokenizer(tiny_dir, hf_tok, tok):
    assert not (tiny_dir / "tokenizer.json").exists()  # the vocab.json + merges.txt path
    assert type(hf_tok).__name__.startswith("Qwen2Tokenizer")
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.im_end_id, tok.pad_id)


@pytest.mark.parametrize("text", CORPUS)
def test_encode_and_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)  # round trip, up to NFC


def test_tokenizer_json_path(tok, hf_tok, tmp_path):
    hf_tok.save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):  # make sure tokenizer.json is what gets read
        if (tmp_path / name).exists():
            (tmp_path / name).unlink()
    assert (tmp_path / "tokenizer.json").exists()
    from_json = load_tokenizer(tmp_path)
    assert (from_json.vocab_size, from_json.im_start_id, from_json.im_end_id, from_json.pad_id) == (
        tok.vocab_size, tok.im_start_id, tok.im_end_id, tok.pad_id)
    for text in CORPUS:
        assert from_json.encode(text) == tok.encode(text)
        assert from_json.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(
            tok.encode(text), skip_special_tokens=True)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_chat_matches_chat_template(tok, hf_tok, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    hf_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert tok.encode(text) == list(hf_ids["input_ids"])


def test_special_token_strings_in_text_are_tokens(tok, hf_tok):
    # Policy: like transformers, a control-token string in user text IS the control token.
    ids = tok.encode("a<|im_end|>b")
    assert ids.count(tok.im_end_id) == 1 and ids == hf_tok.encode("a<|im_end|>b", add_special_tokens=False)
    # <think> is one added token but not a special one: skip_special_tokens keeps it.
    think = tok.encode("<think>")
    assert len(think) == 1
    assert tok.decode(think + [tok.im_end_id], skip_special_tokens=True) == "<think>"


@pytest.mark.skipif(not os.environ.get("SELFKD_QWEN_TOKENIZER_DIR"),
                    reason="set SELFKD_QWEN_TOKENIZER_DIR to a released Qwen3-Omni checkpoint directory")
def test_released_qwen3_omni_tokenizer_and_template():
    """The same checks against the real files, where a checkpoint is at hand (not in CI)."""
    from transformers import AutoTokenizer

    model_dir = os.environ["SELFKD_QWEN_TOKENIZER_DIR"]
    tok, hf_tok = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    assert (tok.pad_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    for text in CORPUS:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    template_file = os.path.join(model_dir, "chat_template.json")
    template = None
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            template = json.load(f)["chat_template"]
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (False, True):
            assert render_chat(messages, add_generation_prompt) == hf_tok.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_render_chat_rejects_non_text(tok):
    with pytest.raises(DataError, match="role must be one of"):
        render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(DataError, match="content must be a string"):
        render_chat([{"role": "user", "content": [{"type": "text", "text": "x"}]}])


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*missing merges.txt, tokenizer_config.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Dataset formats
# ---------------------------------------------------------------------------------------------


def test_bundled_sample_dataset():
    train, evaluation, stats = load_dataset_specs([str(SAMPLE_DATASET)], seed=0, split_ratio=0.1)
    assert 250 <= stats["rows_read"] <= 400 and stats["formats"] == {"alpaca": stats["rows_read"]}
    assert len(train) + len(evaluation) == stats["rows_read"] and len(evaluation) == int(stats["rows_read"] * 0.1)
    assert 0 < stats["teacher_differs"] < len(train)  # some rows carry privileged context
    assert not stats["rows_skipped"]


def test_alpaca_with_system_and_history(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{
        "system": "Be brief.", "history": [["q1", "a1"], ["q2", "a2"]],
        "instruction": "Translate:", "input": "Good morning.", "output": "早上好。",
    }])
    [ex], _, _ = load_dataset_specs([path], seed=0, split_ratio=0.0)
    assert ex.student_messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "Translate:\nGood morning."},
    ]
    assert ex.completion == "早上好。" and ex.teacher_messages == ex.student_messages
    assert ex.source == f"{path}:1"


def test_three_formats_and_json_array_agree(tmp_path):
    alpaca = {"system": "S", "history": [["q1", "a1"]], "instruction": "q2", "output": "a2", "teacher_context": "C"}
    messages = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                             {"role": "assistant", "content": "a2"}], "teacher_context": "C"}
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"},
                                  {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
                                  {"from": "gpt", "value": "a2"}], "teacher_context": "C"}
    jsonl = write_jsonl(tmp_path / "mixed.jsonl", [alpaca, messages, sharegpt])
    array = tmp_path / "mixed.json"
    array.write_text(json.dumps([alpaca, messages, sharegpt], indent=2), encoding="utf-8")
    for path in (jsonl, str(array)):
        examples, _, stats = load_dataset_specs([path], seed=0, split_ratio=0.0)
        assert stats["formats"] == {"alpaca": 1, "messages": 1, "sharegpt": 1}
        first = examples[0]
        for ex in examples[1:]:
            assert (ex.student_messages, ex.teacher_messages, ex.completion) == (
                first.student_messages, first.teacher_messages, first.completion)
    # Rows of a JSON array are named by the line they start on.
    examples, _, _ = load_dataset_specs([str(array)], seed=0, split_ratio=0.0)
    starts = [i for i, line in enumerate(array.read_text().splitlines(), start=1) if line.startswith("  {")]
    assert row_ids(examples) == starts and len(starts) == 3


# ---------------------------------------------------------------------------------------------
# Specs, sampling, splits
# ---------------------------------------------------------------------------------------------


def test_sample_fewer_rows_than_the_file(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    train, _, stats = load_dataset_specs([f"{path}#4"], seed=0, split_ratio=0.0)
    assert len(train) == 4 == len(set(row_ids(train)))
    again, _, _ = load_dataset_specs([f"{path}#4"], seed=0, split_ratio=0.0)
    other, _, _ = load_dataset_specs([f"{path}#4"], seed=1, split_ratio=0.0)
    assert row_ids(again) == row_ids(train) != row_ids(other)
    assert stats["specs"][0] == {"spec": f"{path}#4", "rows_read": 10, "rows_usable": 10, "train": 4, "eval": 0}


def test_sample_more_rows_than_the_file_repeats_like_ms_swift(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(5))
    train, _, _ = load_dataset_specs([f"{path}#12"], seed=0, split_ratio=0.0)
    counts = Counter(row_ids(train))
    # 12 = 2 full passes + 2 rows drawn without replacement.
    assert len(train) == 12 and set(counts) == {1, 2, 3, 4, 5}
    assert sorted(counts.values()) == [2, 2, 2, 3, 3]
    assert row_ids(train)[:10] == [1, 2, 3, 4, 5] * 2


def test_several_specs_concatenate(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(6))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(5))
    train, _, stats = load_dataset_specs([f"{a}#3", b], seed=0, split_ratio=0.0)
    assert [e.source.rsplit(":", 1)[0] for e in train] == [a] * 3 + [b] * 5
    assert stats["rows_read"] == 11 and stats["train"] == 8


def test_split_ratio_is_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20))
    train, evaluation, stats = load_dataset_specs([path], seed=3, split_ratio=0.25)
    assert len(evaluation) == 5 and len(train) == 15
    assert set(row_ids(train)).isdisjoint(row_ids(evaluation))
    train2, evaluation2, _ = load_dataset_specs([path], seed=3, split_ratio=0.25)
    assert row_ids(train2) == row_ids(train) and row_ids(evaluation2) == row_ids(evaluation)
    # N > rows: eval = max(1, int(min(rows, N) * ratio)) rows, and they never appear in train.
    train, evaluation, _ = load_dataset_specs([f"{path}#40"], seed=3, split_ratio=0.1)
    assert len(evaluation) == 2 and len(train) == 38
    assert set(row_ids(train)).isdisjoint(row_ids(evaluation))
    # A tiny ratio still holds out one row.
    _, evaluation, _ = load_dataset_specs([path], seed=3, split_ratio=0.01)
    assert len(evaluation) == 1


def test_hub_id_is_not_downloaded():
    with pytest.raises(DataError) as error:
        load_dataset_specs(["AI-ModelScope/alpaca-gpt4-data-zh#2000"], seed=0, split_ratio=0.01)
    message = str(error.value)
    assert "does not download" in message
    assert "modelscope download --dataset AI-ModelScope/alpaca-gpt4-data-zh" in message
    assert "huggingface-cli download --repo-type dataset AI-ModelScope/alpaca-gpt4-data-zh" in message


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset_specs([str(tmp_path / "missing.jsonl#5")], seed=0, split_ratio=0.0)


@pytest.mark.parametrize("suffix, message", [("#0", "must be positive"), ("#-3", "must be positive"),
                                             ("#abc", "must be a row count")])
def test_bad_row_count(tmp_path, suffix, message):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3))
    with pytest.raises(DataError, match=message):
        load_dataset_specs([path + suffix], seed=0, split_ratio=0.0)


def test_split_leaving_no_training_rows(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(1))
    with pytest.raises(DataError, match="leave no training rows"):
        load_dataset_specs([path], seed=0, split_ratio=0.5)


# ---------------------------------------------------------------------------------------------
# Privileged teacher context
# ---------------------------------------------------------------------------------------------


def test_teacher_context_combination(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"system": "SYS", "teacher_system": "ROW_TS", "teacher_context": "HINT", "instruction": "Q", "output": "ANS"},
        {"instruction": "Q2", "output": "ANS2"},
    ])
    (with_sys, without_sys), _, stats = load_dataset_specs(
        [path], seed=0, split_ratio=0.0, teacher_system="RUN_TS", teacher_sees_reference=True)
    assert with_sys.student_messages == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q"}]
    assert with_sys.teacher_messages == [
        {"role": "system", "content": "SYS\n\nRUN_TS\n\nROW_TS"},
        {"role": "user", "content": "Q\n\nHINT\n\n" + REFERENCE_WRAPPER.format(reference="ANS")},
    ]
    # No own system prompt: the teacher gets one, the student still has none.
    assert without_sys.student_messages == [{"role": "user", "content": "Q2"}]
    assert without_sys.teacher_messages == [
        {"role": "system", "content": "RUN_TS"},
        {"role": "user", "content": "Q2\n\n" + REFERENCE_WRAPPER.format(reference="ANS2")},
    ]
    assert stats["teacher_differs"] == 2
    # The token ids tell the same story.
    enc = encode_example(tok, with_sys, max_length=256, max_completion_length=32)
    student_text, teacher_text = tok.decode(enc.student_prompt_ids), tok.decode(enc.teacher_prompt_ids)
    for secret in ("RUN_TS", "ROW_TS", "HINT", "ANS", "reference answer"):
        assert secret not in student_text and secret in teacher_text
    assert student_text == render_chat(with_sys.student_messages, add_generation_prompt=True)


def test_without_privileged_context_teacher_equals_student(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3))
    train, _, stats = load_dataset_specs([path], seed=0, split_ratio=0.0)
    assert all(e.teacher_messages == e.student_messages for e in train) and stats["teacher_differs"] == 0


# ---------------------------------------------------------------------------------------------
# Encoding and truncation
# ---------------------------------------------------------------------------------------------


def conversation_example(turns=3, completion="The answer is 42.", source="x.jsonl:1"):
    student = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        student += [{"role": "user", "content": f"Question {i}: 你好 <|im_end|> 😀"},
                    {"role": "assistant", "content": f"Reply {i}."}]
    student.append({"role": "user", "content": "Final question?"})
    teacher = [dict(m) for m in student]
    teacher[-1] = {"role": "user", "content": "Final question?\n\nHint: it is 42."}
    return Example(student, teacher, completion, source)


def test_encode_example_without_truncation(tok):
    ex = conversation_example()
    stats = Counter()
    enc = encode_example(tok, ex, max_length=512, max_completion_length=64, stats=stats)
    assert enc.student_prompt_ids == tok.encode(render_chat(ex.student_messages, add_generation_prompt=True))
    assert enc.teacher_prompt_ids == tok.encode(render_chat(ex.teacher_messages, add_generation_prompt=True))
    assert enc.completion_ids == tok.encode(ex.completion) + [tok.im_end_id]
    # Prompt + completion is the rendered conversation (minus the newline after the last <|im_end|>).
    full = ex.student_messages + [{"role": "assistant", "content": ex.completion}]
    assert enc.student_prompt_ids + enc.completion_ids == tok.encode(render_chat(full))[:-1]
    assert sum(stats.values()) == 0


def test_completion_truncation(tok):
    ex = conversation_example(turns=0, completion="one two three four five six seven eight")
    stats = Counter()
    enc = encode_example(tok, ex, max_length=512, max_completion_length=3, stats=stats)
    assert enc.completion_ids == tok.encode(ex.completion)[:3] and tok.im_end_id not in enc.completion_ids
    assert stats == {"completion_truncated": 1, "student_prompt_truncated": 0, "teacher_prompt_truncated": 0}


def test_prompt_left_truncation_keeps_the_final_turn(tok):
    ex = conversation_example(turns=6)
    student_full = tok.encode(render_chat(ex.student_messages, add_generation_prompt=True))
    teacher_full = tok.encode(render_chat(ex.teacher_messages, add_generation_prompt=True))
    completion = tok.encode(ex.completion) + [tok.im_end_id]
    max_length = len(student_full) - 10 + len(completion)
    stats = Counter()
    enc = encode_example(tok, ex, max_length=max_length, max_completion_length=64, stats=stats)
    budget = max_length - len(completion)
    assert enc.student_prompt_ids == student_full[-budget:]
    assert enc.teacher_prompt_ids == teacher_full[-budget:]  # same rule for the teacher
    assert len(enc.student_prompt_ids) + len(enc.completion_ids) == max_length
    assert stats == {"student_prompt_truncated": 1, "teacher_prompt_truncated": 1}


def test_min_tokens_is_a_lower_bound_that_spares_encoding_huge_rows(tok, monkeypatch):
    """min_tokens never exceeds the real count (every CORPUS branch, long runs of one character,
    NFC-expanding text), and a row far over max_length is skipped without being encoded."""
    texts = CORPUS + ["x" * 5000, " " * 5000, "\n" * 5000, "😀" * 2000, "\u0958" * 1000, "ab " * 3000,
                      open(SAMPLE_DATASET, encoding="utf-8").read()]
    for text in texts:
        assert tok.min_tokens(text) <= len(tok.encode(text)), text[:40]
    huge = conversation_example(turns=0)
    huge.student_messages[-1] = huge.teacher_messages[-1] = {"role": "user", "content": "x " * 1_000_000}
    encode = tok.tokenizer.encode
    seen = []
    monkeypatch.setattr(tok.tokenizer, "encode", lambda text, **kw: seen.append(len(text)) or encode(text, **kw))
    stats = Counter()
    assert encode_example(tok, huge, max_length=128, max_completion_length=8, stats=stats) is None
    assert stats == {"skipped_prompt_too_long": 1} and max(seen) < 1000
    with pytest.raises(DataError, match=r"x\.jsonl:1: .*final user turn \(at least \d+ tokens\) and the \d+-token "
                                        r"completion need at least \d+ tokens; raise --max_length to at least \d+"):
        encode_example(tok, huge, max_length=128, max_completion_length=8)
    assert max(seen) < 1000


def test_row_whose_final_turn_cannot_fit(tok):
    ex = conversation_example(turns=1)
    completion_len = len(tok.encode(ex.completion)) + 1
    final_turn_len = len(tok.encode(render_chat(ex.student_messages[-1:], add_generation_prompt=True)))
    max_length = completion_len + final_turn_len - 1  # the student's final turn misses one token
    stats = Counter()
    assert encode_example(tok, ex, max_length, max_completion_length=64, stats=stats) is None
    assert stats == {"skipped_prompt_too_long": 1}
    with pytest.raises(DataError, match="x.jsonl:1: the final user turn does not fit"):
        encode_example(tok, ex, max_length, max_completion_length=64)
    # The teacher's final turn is longer (it carries the hint): it alone can cause the skip.
    assert encode_example(tok, ex, max_length + 1, max_completion_length=64, stats=stats) is None
    with pytest.raises(DataError, match="no example fits"):
        encode_examples(tok, [ex], max_length, max_completion_length=64)
    with pytest.raises(ValueError, match="must be positive"):
        encode_example(tok, ex, max_length=0, max_completion_length=64)


def test_encode_examples_counts(tok):
    examples = [conversation_example(turns=0, completion="ok"),
                conversation_example(turns=0, completion="a b c d e f g h i j k l")]
    encoded, stats = encode_examples(tok, examples, max_length=256, max_completion_length=4)
    assert len(encoded) == 2 and stats["completion_truncated"] == 1


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def test_collate_aligns_every_completion():
    encoded = [
        EncodedExample([1, 2, 3], [1, 2, 3, 4, 5], [10, 11]),
        EncodedExample([4], [6, 7], [12, 13, 14, 15]),
        EncodedExample([5, 6], [8], [16]),
    ]
    pad = 0
    batch = collate(encoded, pad_id=pad)
    assert batch.student_prompt_ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert batch.student_prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch.completion_ids.tolist() == [[10, 11, 0, 0], [12, 13, 14, 15], [16, 0, 0, 0]]
    assert batch.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch.completion_ids.dtype == batch.completion_mask.dtype == torch.long
    for prompt_ids, prompt_mask, width in ((batch.student_prompt_ids, batch.student_prompt_mask, 3),
                                           (batch.teacher_prompt_ids, batch.teacher_prompt_mask, 5)):
        input_ids, attention_mask, start = join_prompt_completion(
            prompt_ids, prompt_mask, batch.completion_ids, batch.completion_mask)
        assert start == width and input_ids.shape == (3, width + 4)
        for row, e in enumerate(encoded):
            # Every completion starts at the same column; the prompt ends right before it.
            assert input_ids[row, start:start + len(e.completion_ids)].tolist() == e.completion_ids
            assert input_ids[row, :start][attention_mask[row, :start] == 1].tolist() == (
                e.student_prompt_ids if width == 3 else e.teacher_prompt_ids)
            assert attention_mask[row].sum() == len(e.completion_ids) + (
                len(e.student_prompt_ids) if width == 3 else len(e.teacher_prompt_ids))
        labels = labels_for(input_ids, attention_mask, start)
        assert (labels[:, :start] == -100).all()
        assert labels[:, start:].tolist() == [[10, 11, -100, -100], [12, 13, 14, 15], [16, -100, -100, -100]]


def test_collate_real_examples(tok):
    examples = [conversation_example(turns=t, completion="x" * (t + 1)) for t in range(3)]
    encoded, _ = encode_examples(tok, examples, max_length=512, max_completion_length=64)
    batch = collate(encoded, tok.pad_id)
    input_ids, attention_mask, start = join_prompt_completion(
        batch.student_prompt_ids, batch.student_prompt_mask, batch.completion_ids, batch.completion_mask)
    labels = labels_for(input_ids, attention_mask, start)
    for row, e in enumerate(encoded):
        scored = labels[row][labels[row] != -100].tolist()
        assert scored == e.completion_ids and scored[-1] == tok.im_end_id


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

GOOD = {"instruction": "q", "output": "a"}


def load(path, **kwargs):
    return load_dataset_specs([str(path)], seed=0, split_ratio=0.0, **kwargs)


def test_malformed_json_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"instruction": "q", "output": }\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        load(path)


def test_malformed_json_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load(path)
    path.write_text('[\n  {"instruction": "q", "output": "a"}\n]\n{"extra": 1}\n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON: extra data"):
        load(path)


def test_missing_required_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"instruction": "q"}])
    with pytest.raises(DataError, match=rf"{path}:2: missing required field 'output'"):
        load(path)
    path = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(DataError, match=rf"{path}:1: messages\[0\]: missing required field 'content'"):
        load(path)


@pytest.mark.parametrize("row, message", [
    ({"instruction": "q", "output": 5}, "field 'output': expected string, got int"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, r"field 'history\[0\]': expected \[question"),
    ({"instruction": "q", "output": "a", "teacher_context": ["x"]},
     "field 'teacher_context': expected string, got array"),
    ({"messages": [{"role": "user", "content": 5}]}, r"field 'content': expected string, got int"),
    ({"conversations": "human: hi"}, "field 'conversations': expected array, got string"),
    (["instruction", "output"], "a row must be a JSON object, got array"),
])
def test_wrong_types(tmp_path, row, message):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, row])
    with pytest.raises(DataError, match=rf"{path}:2: .*{message}"):
        load(path)


@pytest.mark.parametrize("row", [
    {"instruction": "q", "output": ""},
    {"instruction": "q", "output": "  \n"},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
])
def test_empty_completion(tmp_path, row):
    path = write_jsonl(tmp_path / "a.jsonl", [row])
    with pytest.raises(DataError, match=rf"{path}:1: empty completion"):
        load(path)


@pytest.mark.parametrize("turns, message", [
    ([("user", "q")], "must end with a user turn followed by the assistant reply"),
    ([("assistant", "a"), ("assistant", "b")], "must end with a user turn followed by the assistant reply"),
    ([("user", "q"), ("system", "s"), ("user", "q"), ("assistant", "a")], "system message may only come first"),
    ([("tool", "x"), ("user", "q"), ("assistant", "a")], "unsupported role 'tool'"),
])
def test_bad_conversation(tmp_path, turns, message):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": r, "content": c} for r, c in turns]}])
    with pytest.raises(DataError, match=message):
        load(path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "a.jsonl"
    first = json.dumps(GOOD).encode() + b"\n"
    second = b'{"instruction": "caf\xe9", "output": "a"}\n'  # latin-1, not UTF-8
    path.write_bytes(first + second)
    offset = len(first) + second.index(b"\xe9")
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8 at byte offset {offset}"):
        load(path)
    # In a JSON array the whole file is unreadable: it raises even when skipping bad rows.
    array = tmp_path / "a.json"
    array.write_bytes(b"[\n" + first.strip() + b",\n" + second.strip() + b"\n]")
    offset = len(b"[\n" + first.strip() + b",\n") + second.index(b"\xe9")
    with pytest.raises(DataError, match=rf"{array}:3: invalid UTF-8 at byte offset {offset}"):
        load(array, skip_bad_rows=True)


def test_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=rf"{path}:1: unknown row format; keys seen: \['answer', 'question'\]"):
        load(path)


@pytest.mark.parametrize("content", ["", "\n  \n", "\ufeff"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "a.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}: the file is empty"):
        load(path)


@pytest.mark.parametrize("content", ["[]", '{"question": "q"}\n{"instruction": "q", "output": ""}\n'])
def test_empty_dataset_after_filtering(tmp_path, content):
    path = tmp_path / "a.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}: no usable rows"):
        load(path, skip_bad_rows=True)


def test_skip_bad_rows_counts_by_reason(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps({"instruction": "q"}),
        json.dumps({"instruction": "q", "output": 1}),
        json.dumps({"instruction": "q", "output": " "}),
        json.dumps({"foo": 1}),
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        "",
        json.dumps(GOOD),
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n" + b'{"instruction": "\xff", "output": "a"}\n')
    train, _, stats = load(path, skip_bad_rows=True)
    assert row_ids(train) == [1, 9]
    assert stats["rows_read"] == 9 and stats["train"] == 2
    assert stats["rows_skipped"] == {"malformed_json": 1, "missing_field": 1, "wrong_type": 1,
                                     "empty_completion": 1, "unknown_format": 1, "bad_conversation": 1,
                                     "invalid_utf8": 1}
    assert [m.split(":")[1] for m in stats["bad_rows"]] == ["2", "3", "4", "5", "6", "7", "10"]
    assert all(m.startswith(f"{path}:") for m in stats["bad_rows"])


def test_special_token_text_in_a_row_matches_transformers(tmp_path, tok, hf_tok):
    # The documented policy, end to end: an "<|im_end|>" typed into a row ends up as the token.
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "stop<|im_end|>here", "output": "ok"}])
    [ex], _, _ = load(path)
    enc = encode_example(tok, ex, max_length=128, max_completion_length=16)
    hf_ids = hf_tok.apply_chat_template(ex.student_messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert enc.student_prompt_ids == list(hf_ids)
    assert enc.student_prompt_ids.count(tok.im_end_id) == 2  # the injected one and the turn's own


def test_readable_shows_the_ids_a_tokenizer_lacks(tok):
    """A tokenizer may cover fewer ids than the model's embedding has rows: an id it lacks shows
    as <id> (decode alone drops it), special tokens are left out."""
    hello = tok.encode("hello world")
    missing = tok.vocab_size  # the first id past the tokenizer's vocabulary
    assert tok.readable(hello) == tok.decode(hello) == "hello world"
    assert tok.readable(hello + [missing] + hello + tok.eos_ids[:1]) == f"hello world<{missing}>hello world"
    assert tok.decode([missing]) == "" and tok.readable([missing, missing]) == f"<{missing}><{missing}>"
