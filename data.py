"""Data for selfkd: tokenizer, chat format, datasets, truncation and batches.

Read top to bottom; each section builds on the one before:

1. Tokenizer    -- a Qwen2Tokenizer built from `tokenizers` alone (no transformers at runtime).
2. Chat format  -- Qwen3-Omni text-only ChatML, and a tiny trainable tokenizer for tests.
3. Datasets     -- alpaca / OpenAI `messages` / ShareGPT rows -> student and teacher prompts.
4. Encoding     -- token ids plus the truncation rule.
5. Batches      -- padding, and where each completion starts.

Rules this module chooses (the README repeats them):

* Special-token strings in text: we do what transformers' Qwen2Tokenizer does, because the
  goal is to see exactly the token ids the model was trained with. A literal "<|im_end|>"
  inside a user message therefore becomes the control token, i.e. a row can inject
  ChatML structure. Clean the data if that matters; we do not escape it.
* 'path#N' (ms-swift syntax): N rows are drawn with the seed. N < rows: a random subset
  without replacement. N > rows: like ms-swift, every row is used N // rows times and
  N % rows further rows are drawn without replacement, so any two rows' counts differ by
  at most one. (Same rule as ms-swift's sample_dataset, not the same indices.)
* split_ratio (per spec, before sampling, like ms-swift): max(1, int(min(rows, N) * ratio))
  rows are held out for eval, and the N - eval training rows are sampled from the rest,
  so an eval row never shows up in training, even when N > rows.
* Privileged teacher context (the student never sees any of it):
  teacher system prompt = "\n\n".join of the non-empty parts
      [row `system`, run-wide `teacher_system`, row `teacher_system`]
  (the teacher sees the student's system prompt first, then its extra instructions);
  teacher final user turn = user text + "\n\n" + row `teacher_context`
      + "\n\n" + REFERENCE_WRAPPER with the reference answer, if teacher_sees_reference.
* Truncation (encode_example): the completion (text + <|im_end|>) is cut to
  max_completion_length tokens; a cut completion keeps no <|im_end|>, so the model is never
  taught to stop mid-answer. Then each prompt (student and teacher alike) keeps its LAST
  max_length - len(completion) tokens: the system prompt and the oldest turns go first,
  as in ms-swift's truncation_strategy 'left'. If even the final user turn plus the
  assistant header does not fit, the row is skipped and counted (or, with no stats dict
  to count it in, it raises): a prompt without its question would teach nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer


class DataError(ValueError):
    """A problem with the data or the dataset specs.

    `reason` is a short key ("malformed_json", "missing_field", ...) under which a skipped
    row is counted when skip_bad_rows=True.
    """

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# 1. Tokenizer
# ---------------------------------------------------------------------------------------------

# Qwen2Tokenizer's pre-tokenizer regex: letters, single digits, punctuation runs and
# whitespace runs become separate pieces before byte-level BPE sees them.
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-Omni's added tokens used here, in the order of their real ids (151643 ...).
# `special` decides whether decode(skip_special_tokens=True) drops them; <think> tags are
# added tokens (never split) but not special, as in the released tokenizer_config.json.
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<|audio_start|>", True),
    ("<|audio_end|>", True),
    ("<|audio_pad|>", True),
)


def _qwen_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Give a BPE tokenizer Qwen2Tokenizer's normalizer, pre-tokenizer and decoder."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            # use_regex=False: the Split above already did the splitting.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the ChatML token ids the trainer needs."""

    def __init__(self, tokenizer: Tokenizer, pad_token: str, source: str):
        self.tokenizer = tokenizer
        self.im_start_id = self._id_of("<|im_start|>", source)
        self.im_end_id = self._id_of("<|im_end|>", source)
        self.pad_id = self._id_of(pad_token, source)
        # Generation stops at the end of a turn, or at <|endoftext|> (Qwen's document end).
        self.eos_ids = [self.im_end_id, self._id_of("<|endoftext|>", source)]
        # max id + 1, not a count: the embedding matrix must cover every id.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def _id_of(self, token: str, source: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{source}: the tokenizer has no {token!r} token; is this a Qwen tokenizer?")
        return token_id

    def encode(self, text: str) -> list[int]:
        # No BOS and no post-processing, as Qwen2Tokenizer; added tokens inside `text` are
        # matched as tokens (see the module docstring).
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _token_content(value) -> str | None:
    """tokenizer_config.json stores a token either as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(model_dir) -> ChatTokenizer:
    """Load a Qwen tokenizer: tokenizer.json if present, else vocab.json + merges.txt +
    tokenizer_config.json (the layout the released Qwen3-Omni checkpoint ships)."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"tokenizer directory {model_dir!r} does not exist")
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    pad_token = _token_content(config.get("pad_token")) or "<|endoftext|>"

    tokenizer_json = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        return ChatTokenizer(Tokenizer.from_file(tokenizer_json), pad_token, tokenizer_json)

    needed = ("vocab.json", "merges.txt", "tokenizer_config.json")
    missing = [name for name in needed if not os.path.isfile(os.path.join(model_dir, name))]
    if missing:
        raise FileNotFoundError(
            f"{model_dir}: no tokenizer.json, and the vocab.json + merges.txt + tokenizer_config.json "
            f"layout is incomplete: missing {', '.join(missing)}"
        )
    vocab, merges = BPE.read_file(os.path.join(model_dir, "vocab.json"), os.path.join(model_dir, "merges.txt"))
    tokenizer = _qwen_pipeline(Tokenizer(BPE(vocab, merges)))

    # Added tokens get the next free ids in the order we add them, so add them by id and
    # check that the ids came out as the file says (they must follow the BPE vocab).
    added = config.get("added_tokens_decoder", {})
    for token_id, spec in sorted(added.items(), key=lambda item: int(item[0])):
        token = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False),
            special=spec.get("special", False),
        )
        tokenizer.add_tokens([token])
        if tokenizer.token_to_id(spec["content"]) != int(token_id):
            raise ValueError(
                f"{config_path}: added token {spec['content']!r} should have id {token_id} but got "
                f"{tokenizer.token_to_id(spec['content'])}; added token ids must follow the BPE vocab "
                "without gaps"
            )
    return ChatTokenizer(tokenizer, pad_token, config_path)


# ---------------------------------------------------------------------------------------------
# 2. Chat format
# ---------------------------------------------------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant")

# The Jinja template written into tokenizer_config.json / chat_template.json by
# write_tiny_tokenizer, in the style of Qwen3-Omni's: ChatML turns, no default system
# prompt, media parts become placeholder tokens. For text messages it renders exactly
# what render_chat returns (a test checks this through transformers).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.content is string %}"
    "{%- set content = message.content %}"
    "{%- else %}"
    "{%- set ns = namespace(text='') %}"
    "{%- for part in message.content %}"
    "{%- if part.type == 'image' %}"
    "{%- set ns.text = ns.text + '<|vision_start|><|image_pad|><|vision_end|>' %}"
    "{%- elif part.type == 'video' %}"
    "{%- set ns.text = ns.text + '<|vision_start|><|video_pad|><|vision_end|>' %}"
    "{%- elif part.type == 'audio' %}"
    "{%- set ns.text = ns.text + '<|audio_start|><|audio_pad|><|audio_end|>' %}"
    "{%- elif part.type == 'text' %}"
    "{%- set ns.text = ns.text + part.text %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- set content = ns.text %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Text-only Qwen3-Omni ChatML. No default system prompt is added.

    Every turn renders on its own ("<|im_start|>{role}\\n{content}<|im_end|>\\n"), so the
    rendering of a conversation is the concatenation of the renderings of its turns;
    encoding relies on that to find the final user turn.
    """
    parts = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise DataError(f"message {i}: role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"message {i}: content must be a string, got {type(content).__name__}")
        parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


SAMPLE_DATASET = Path(__file__).resolve().parent / "data" / "sample_alpaca.jsonl"

# Text the tiny tokenizer should see besides the sample rows: the ChatML role names, so
# that they become single tokens as in the real vocabulary, and a common English system prompt.
_TINY_TOKENIZER_EXTRA_TEXT = "system\nuser\nassistant\nYou are a helpful assistant.\n"


def write_tiny_tokenizer(out_dir, vocab_size: int = 1024) -> None:
    """Train a small Qwen-style byte-level BPE on the bundled sample dataset and write it in
    the released checkpoint's layout: vocab.json, merges.txt, tokenizer_config.json,
    chat_template.json. The vocabulary has at most `vocab_size` ids (fewer only if the text
    runs out of merges); the added tokens take the ids right after the BPE vocab.
    """
    n_added = len(QWEN_ADDED_TOKENS)
    if vocab_size < 256 + n_added + 1:
        raise ValueError(f"vocab_size must be at least {256 + n_added + 1} (256 bytes + added tokens + 1 merge)")
    train, _, _ = load_dataset_specs([str(SAMPLE_DATASET)], seed=0, split_ratio=0.0)
    texts = [_TINY_TOKENIZER_EXTRA_TEXT, REFERENCE_WRAPPER]
    for example in train:
        texts += [message["content"] for message in example.teacher_messages] + [example.completion]

    tokenizer = _qwen_pipeline(Tokenizer(BPE()))
    trainer = BpeTrainer(
        vocab_size=vocab_size - n_added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.model.save(out_dir)  # vocab.json and merges.txt
    first_id = tokenizer.get_vocab_size()
    added_tokens_decoder = {
        str(first_id + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(QWEN_ADDED_TOKENS)
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    with open(os.path.join(out_dir, "chat_template.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f, ensure_ascii=False, indent=2)


# ---------------------------------------------------------------------------------------------
# 3. Datasets
# ---------------------------------------------------------------------------------------------

# Appended (after a blank line) to the teacher's last user turn when teacher_sees_reference
# is on: the teacher is shown the dataset answer, the student is not (OPSD-style).
REFERENCE_WRAPPER = (
    "Here is a reference answer:\n{reference}\n"
    "After reading the reference answer, write your own answer to the request above."
)

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class Example:
    student_messages: list[dict]  # prompt turns: optional system, history, final user turn
    teacher_messages: list[dict]  # the same turns plus the privileged context
    completion: str  # the last assistant turn: the reference answer
    source: str  # "path:line", for errors and logs


def _type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# --- reading files ---------------------------------------------------------------------------


def _read_rows(path: str) -> list[tuple[int, object]]:
    """(line, row) for every row of a JSON array or JSONL file.

    A problem confined to one JSONL line comes back in place of its row as a DataError, so
    the caller can skip it; a problem with the whole file raises.
    """
    with open(path, "rb") as f:
        data = f.read()
    offset = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    if not data[offset:].strip():
        raise DataError(f"{path}: the file is empty", "empty_file")
    # JSON array or JSONL: an array is the only valid file that starts with "[".
    if data[offset:].lstrip().startswith(b"["):
        return _read_json_array(path, data, offset)
    return _read_jsonl(path, data, offset)


def _utf8_error(path: str, data: bytes, error: UnicodeDecodeError, base_offset: int) -> DataError:
    offset = base_offset + error.start  # into the whole file
    line = data[:offset].count(b"\n") + 1
    return DataError(f"{path}:{line}: invalid UTF-8 at byte offset {offset} ({error.reason})", "invalid_utf8")


def _read_jsonl(path: str, data: bytes, offset: int) -> list[tuple[int, object]]:
    rows = []
    for line_no, raw in enumerate(data[offset:].split(b"\n"), start=1):
        if raw.strip():  # blank lines are not rows
            rows.append((line_no, _parse_jsonl_line(path, data, raw, offset, line_no)))
        offset += len(raw) + 1
    return rows


def _parse_jsonl_line(path: str, data: bytes, raw: bytes, offset: int, line_no: int):
    """The row on one JSONL line, or the DataError that describes what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _utf8_error(path, data, e, offset)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(f"{path}:{line_no}: malformed JSON: {e.msg} (column {e.colno})", "malformed_json")


def _read_json_array(path: str, data: bytes, offset: int) -> list[tuple[int, object]]:
    # Parse element by element (raw_decode) to know the line each row starts on.
    try:
        text = data[offset:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, data, e, offset) from None
    decoder = json.JSONDecoder()
    rows = []
    pos = text.index("[") + 1
    try:
        while True:
            pos = _skip_whitespace(text, pos)
            if text.startswith("]", pos) and not rows:
                break
            row, end = decoder.raw_decode(text, pos)
            rows.append((text.count("\n", 0, pos) + 1, row))
            pos = _skip_whitespace(text, end)
            if text.startswith("]", pos):
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("expected ',' or ']' after an array element", text, pos)
            pos += 1
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})", "malformed_json") from None
    if text[pos + 1 :].strip():
        line = text.count("\n", 0, pos + 1) + 1
        raise DataError(f"{path}:{line}: malformed JSON: extra data after the closing ']'", "malformed_json")
    return rows


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# --- one row -> one Example ------------------------------------------------------------------


def _string_field(row: dict, key: str, source: str, required: bool) -> str | None:
    """A string field; null counts as absent."""
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{source}: missing required field '{key}'", "missing_field")
        return None
    if not isinstance(value, str):
        raise DataError(f"{source}: field '{key}': expected string, got {_type_name(value)}", "wrong_type")
    return value


def _alpaca_turns(row: dict, source: str) -> list[dict]:
    instruction = _string_field(row, "instruction", source, required=False)
    query_input = _string_field(row, "input", source, required=False)
    output = _string_field(row, "output", source, required=True)
    system = _string_field(row, "system", source, required=False)
    # As ms-swift: "instruction\ninput" when both are given, else whichever is.
    query = "\n".join(part for part in (instruction, query_input) if part)
    if not query:
        raise DataError(f"{source}: missing required field 'instruction' (or a non-empty 'input')", "missing_field")
    turns = [{"role": "system", "content": system}] if system else []
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise DataError(f"{source}: field 'history': expected array, got {_type_name(history)}", "wrong_type")
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise DataError(
                    f"{source}: field 'history[{i}]': expected [question, answer] (two strings), got {pair!r}",
                    "wrong_type",
                )
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns + [{"role": "user", "content": query}, {"role": "assistant", "content": output}]


def _list_turns(row: dict, key: str, role_key: str, text_key: str, roles: dict, source: str) -> list[dict]:
    """Turns from an OpenAI `messages` or ShareGPT `conversations` list."""
    items = row[key]
    if not isinstance(items, list):
        raise DataError(f"{source}: field '{key}': expected array, got {_type_name(items)}", "wrong_type")
    turns = []
    for i, item in enumerate(items):
        field = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{source}: field '{field}': expected object, got {_type_name(item)}", "wrong_type")
        role = _string_field(item, role_key, f"{source}: {field}", required=True)
        text = _string_field(item, text_key, f"{source}: {field}", required=True)
        if role not in roles:
            raise DataError(
                f"{source}: field '{field}.{role_key}': unsupported role {role!r}, expected one of {', '.join(roles)}",
                "bad_conversation",
            )
        turns.append({"role": roles[role], "content": text})
    return turns


def _check_conversation(turns: list[dict], source: str) -> None:
    roles = [turn["role"] for turn in turns]
    if len(roles) < 2 or roles[-1] != "assistant" or roles[-2] != "user":
        raise DataError(
            f"{source}: a conversation must end with a user turn followed by the assistant reply "
            f"(the completion); roles seen: {roles}",
            "bad_conversation",
        )
    if "system" in roles[1:]:
        raise DataError(f"{source}: a system message may only come first; roles seen: {roles}", "bad_conversation")
    if not turns[-1]["content"].strip():
        raise DataError(f"{source}: empty completion (the last assistant turn has no text)", "empty_completion")


def _teacher_messages(
    student: list[dict], system_parts: list[str | None], user_parts: list[str | None]
) -> list[dict]:
    """The student's turns with the privileged context added (rule in the module docstring)."""
    teacher = [dict(message) for message in student]
    has_system = teacher[0]["role"] == "system"
    own_system = teacher[0]["content"] if has_system else None
    system = "\n\n".join(part for part in [own_system, *system_parts] if part)
    if has_system:
        teacher[0]["content"] = system
    elif system:
        teacher.insert(0, {"role": "system", "content": system})
    teacher[-1]["content"] = "\n\n".join(part for part in [teacher[-1]["content"], *user_parts] if part)
    return teacher


def _parse_row(
    row, source: str, teacher_system: str | None, teacher_sees_reference: bool
) -> tuple[str, Example]:
    """(format name, Example) for one row; raises DataError naming the source."""
    if not isinstance(row, dict):
        raise DataError(f"{source}: a row must be a JSON object, got {_type_name(row)}", "wrong_type")
    if "messages" in row:
        fmt = "messages"
        turns = _list_turns(row, "messages", "role", "content", {r: r for r in CHAT_ROLES}, source)
    elif "conversations" in row:
        fmt = "sharegpt"
        turns = _list_turns(row, "conversations", "from", "value", _SHAREGPT_ROLES, source)
    elif row.keys() & {"instruction", "input", "output"}:
        fmt = "alpaca"
        turns = _alpaca_turns(row, source)
    else:
        raise DataError(
            f"{source}: unknown row format; keys seen: {sorted(row)}; expected alpaca "
            "(instruction/input/output), OpenAI 'messages' or ShareGPT 'conversations'",
            "unknown_format",
        )
    _check_conversation(turns, source)
    student, completion = turns[:-1], turns[-1]["content"]
    row_teacher_system = _string_field(row, "teacher_system", source, required=False)
    teacher_context = _string_field(row, "teacher_context", source, required=False)
    reference = REFERENCE_WRAPPER.format(reference=completion) if teacher_sees_reference else None
    teacher = _teacher_messages(student, [teacher_system, row_teacher_system], [teacher_context, reference])
    return fmt, Example(student, teacher, completion, source)


# --- specs, sampling and the eval split ------------------------------------------------------

# A ModelScope / Hugging Face dataset id: "owner/name", no file extension.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w-][\w.-]*$")


def _parse_spec(spec: str) -> tuple[str, int | None]:
    """'path' or 'path#N' -> (path, N)."""
    if os.path.exists(spec) or "#" not in spec:
        path, count = spec, None
    else:
        path, _, count_text = spec.rpartition("#")
        try:
            count = int(count_text)
        except ValueError:
            raise DataError(
                f"dataset spec {spec!r}: the part after '#' must be a row count, got {count_text!r}"
            ) from None
        if count <= 0:
            raise DataError(f"dataset spec {spec!r}: the row count after '#' must be positive, got {count}")
    if os.path.isfile(path):
        return path, count
    if _HUB_ID.match(path) and not path.endswith((".json", ".jsonl")):
        raise DataError(
            f"dataset spec {spec!r}: {path!r} is not a local file; it looks like a ModelScope / Hugging Face "
            "dataset id, and selfkd does not download datasets. Fetch it first, e.g.\n"
            f"  modelscope download --dataset {path} --local_dir ./datasets/{path.split('/')[-1]}\n"
            f"  huggingface-cli download --repo-type dataset {path} --local-dir ./datasets/{path.split('/')[-1]}\n"
            "then pass the downloaded .json/.jsonl file (convert CSV/Parquet to JSONL first), keeping the '#N', e.g. "
            f"./datasets/{path.split('/')[-1]}/train.jsonl#{count or 'N'}"
        )
    raise DataError(f"dataset spec {spec!r}: no such file {path!r}")


def _split_and_sample(
    n_rows: int, n_sample: int | None, split_ratio: float, rng: np.random.RandomState, spec: str
) -> tuple[list[int], list[int]]:
    """Row indices (train, eval) for one spec; the rule is in the module docstring."""
    n_sample = n_rows if n_sample is None else n_sample
    n_eval = max(int(min(n_rows, n_sample) * split_ratio), 1) if split_ratio > 0 else 0
    order = rng.permutation(n_rows)
    eval_idx = sorted(order[:n_eval].tolist())
    pool = sorted(order[n_eval:].tolist())  # file order, for readable logs
    n_train = n_sample - n_eval
    if n_train <= 0 or not pool:
        raise DataError(
            f"dataset spec {spec!r}: {n_rows} usable rows, {n_sample} requested and {n_eval} held out for eval "
            "leave no training rows"
        )
    repeats, remainder = divmod(n_train, len(pool))
    picks = list(range(len(pool))) * repeats + rng.permutation(len(pool))[:remainder].tolist()
    return [pool[i] for i in picks], eval_idx


def load_dataset_specs(
    specs: list[str],
    seed: int,
    split_ratio: float,
    teacher_system: str | None = None,
    teacher_sees_reference: bool = False,
    skip_bad_rows: bool = False,
) -> tuple[list[Example], list[Example], dict]:
    """Load 'path' / 'path#N' specs into (train, eval, stats).

    Specs are concatenated in order; one numpy RandomState(seed), used spec after spec,
    makes the sampling and the eval split reproducible. With skip_bad_rows, a bad row is
    dropped, counted in stats["rows_skipped"][reason] and described in stats["bad_rows"];
    without it, the first bad row raises DataError.
    """
    if not specs:
        raise DataError("no dataset specs given")
    if not 0 <= split_ratio < 1:
        raise DataError(f"split_ratio must be in [0, 1), got {split_ratio}")
    rng = np.random.RandomState(seed)
    train, evaluation = [], []
    stats = {"specs": [], "rows_read": 0, "rows_skipped": Counter(), "bad_rows": [], "formats": Counter()}
    for spec in specs:
        path, n_sample = _parse_spec(spec)
        examples = []
        rows = _read_rows(path)
        for line, row in rows:
            try:
                if isinstance(row, DataError):
                    raise row
                fmt, example = _parse_row(row, f"{path}:{line}", teacher_system, teacher_sees_reference)
            except DataError as error:
                if not skip_bad_rows:
                    raise
                stats["rows_skipped"][error.reason] += 1
                stats["bad_rows"].append(str(error))
                continue
            stats["formats"][fmt] += 1
            examples.append(example)
        stats["rows_read"] += len(rows)
        if not examples:
            why = f"all {len(rows)} rows were bad and skipped" if rows else "the file holds no rows"
            raise DataError(f"{path}: no usable rows: {why}", "empty_dataset")
        train_idx, eval_idx = _split_and_sample(len(examples), n_sample, split_ratio, rng, spec)
        train += [examples[i] for i in train_idx]
        evaluation += [examples[i] for i in eval_idx]
        stats["specs"].append({
            "spec": spec, "rows_read": len(rows), "rows_usable": len(examples),
            "train": len(train_idx), "eval": len(eval_idx),
        })
    stats["train"], stats["eval"] = len(train), len(evaluation)
    # With no privileged context the teacher equals the student and GKD cannot move
    # (REFERENCE.md section 4); the trainer can warn when this is 0.
    stats["teacher_differs"] = sum(e.teacher_messages != e.student_messages for e in train)
    return train, evaluation, stats


# ---------------------------------------------------------------------------------------------
# 4. Encoding and truncation
# ---------------------------------------------------------------------------------------------


@dataclass
class EncodedExample:
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    completion_ids: list[int]  # ends with <|im_end|> unless the completion was truncated


def _fit_prompt(tok: ChatTokenizer, messages: list[dict], budget: int) -> tuple[list[int], bool] | None:
    """(prompt ids, truncated?) keeping at most `budget` tokens from the left, or None when
    the final user turn plus the assistant header alone exceed the budget.

    render_chat renders each turn on its own and every turn starts with the <|im_start|>
    token, so encoding the history and the final turn apart gives exactly the ids of the
    whole prompt, and tells us how long the final turn is.
    """
    head = tok.encode(render_chat(messages[:-1]))
    tail = tok.encode(render_chat(messages[-1:], add_generation_prompt=True))
    if len(tail) > budget:
        return None
    ids = head + tail
    return ids[-budget:], len(ids) > budget


def encode_example(
    tok: ChatTokenizer, ex: Example, max_length: int, max_completion_length: int, stats: Counter | None = None
) -> EncodedExample | None:
    """Token ids for one example, truncated by the rule in the module docstring.

    Truncations are counted in `stats`. A row whose final user turn cannot fit is counted
    there and gives None; without a `stats` to count it in, it raises DataError instead,
    so a row is never dropped silently.
    """
    if max_length <= 0 or max_completion_length <= 0:
        raise ValueError(
            f"max_length and max_completion_length must be positive, got {max_length}, {max_completion_length}"
        )
    counts = Counter() if stats is None else stats
    completion_ids = tok.encode(ex.completion) + [tok.im_end_id]
    if len(completion_ids) > max_completion_length:
        completion_ids = completion_ids[:max_completion_length]
        counts["completion_truncated"] += 1
    budget = max_length - len(completion_ids)
    student = _fit_prompt(tok, ex.student_messages, budget)
    teacher = _fit_prompt(tok, ex.teacher_messages, budget)
    if student is None or teacher is None:
        if stats is None:
            raise DataError(
                f"{ex.source}: the final user turn does not fit in max_length={max_length} next to a "
                f"{len(completion_ids)}-token completion",
                "prompt_too_long",
            )
        stats["skipped_prompt_too_long"] += 1
        return None
    counts["student_prompt_truncated"] += student[1]
    counts["teacher_prompt_truncated"] += teacher[1]
    return EncodedExample(student[0], teacher[0], completion_ids)


def encode_examples(
    tok: ChatTokenizer, examples: list[Example], max_length: int, max_completion_length: int
) -> tuple[list[EncodedExample], Counter]:
    """encode_example over a list: (encoded rows, truncation and skip counts)."""
    stats = Counter()
    encoded = [encode_example(tok, ex, max_length, max_completion_length, stats) for ex in examples]
    kept = [e for e in encoded if e is not None]
    if examples and not kept:
        raise DataError(
            f"no example fits max_length={max_length}: all {len(examples)} were skipped (final user turn too long)",
            "empty_dataset",
        )
    return kept, stats


# ---------------------------------------------------------------------------------------------
# 5. Batches
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    student_prompt_ids: torch.Tensor  # [B, Ps] LEFT-padded with pad_id
    student_prompt_mask: torch.Tensor  # [B, Ps] 1 on real tokens
    teacher_prompt_ids: torch.Tensor  # [B, Pt] LEFT-padded
    teacher_prompt_mask: torch.Tensor  # [B, Pt]
    completion_ids: torch.Tensor  # [B, C] RIGHT-padded
    completion_mask: torch.Tensor  # [B, C] 1 on real completion tokens


def _pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def collate(encoded: list[EncodedExample], pad_id: int) -> Batch:
    """Prompts padded on the left, completions on the right, so that cat(prompt, completion)
    starts every completion at the same column (see join_prompt_completion)."""
    if not encoded:
        raise ValueError("collate needs at least one example")
    student = _pad([e.student_prompt_ids for e in encoded], pad_id, left=True)
    teacher = _pad([e.teacher_prompt_ids for e in encoded], pad_id, left=True)
    completion = _pad([e.completion_ids for e in encoded], pad_id, left=False)
    return Batch(*student, *teacher, *completion)


def join_prompt_completion(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, completion_start): the completion of every row starts at
    column completion_start (= the prompt width); logits at columns completion_start - 1 ...
    predict the completion tokens. Position ids for the left padding are the model's job."""
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"batch sizes differ: prompt {prompt_ids.shape[0]}, completion {completion_ids.shape[0]}")
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return input_ids, attention_mask, prompt_ids.shape[1]


def labels_for(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: int) -> torch.Tensor:
    """Labels aligned with input_ids (HF convention: the loss shifts them), -100 on the prompt
    and on padding, so only real completion tokens are scored."""
    labels = input_ids.clone()
    labels[:, :completion_start] = -100
    labels[attention_mask == 0] = -100
    return labels
