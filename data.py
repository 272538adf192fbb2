"""Data for selfkd: dataset files and their rows into Examples (student and teacher prompts, the
reference completion, the media preprocessed once), and `python data.py inspect DATASET`.

Read top to bottom: reading files, one row -> one Example (alpaca / OpenAI `messages` / ShareGPT
rows, with images, audio and video, -> student and teacher prompts), media in rows and their
preprocessing (media.py, once per file), specs, sampling and the eval split.
`python data.py inspect DATASET` runs inspect_data.py: what every row becomes, before any training.

chat.py turns Examples into token ids and batches. Rules this module chooses (the README repeats them):

* Media in rows: ms-swift's form -- top-level `images` / `audios` / `videos` lists and
  <image> / <audio> / <video> tags in the text, the k-th tag of a kind taking the k-th entry
  of its list -- or transformers' content lists: a turn's content is a list of
  {"type": "text", "text": ...}, {"type": "image", "image": path}, {"type": "audio",
  "audio": path}, {"type": "video", "video": path or [frame image paths]}. Both work in
  alpaca, messages and ShareGPT rows (alpaca: tags only). Paths are relative to the dataset
  file. Tags are read only in rows that have at least one of the three lists (so a text row
  is taken verbatim), and there must be exactly one tag per list entry: ms-swift would
  prepend missing tags to the first turn; we ask for them where the media belong. Media go
  in user turns; the completion is text. Row field `use_audio_in_video` (default false):
  each video of the row also brings its sound track, interleaved with its frames.
  Row fields `caption` and `transcript` (string or list of strings: what the media show /
  say) are kept on the Example; row field `teacher_messages` (prompt turns, same forms;
  its tags take the row's list entries in order, and may use fewer) replaces the student's
  turns as the base of the teacher's prompt.
* Media are decoded and preprocessed at load, before any model exists, for the drawn rows
  only (after 'path#N' sampling and the eval split), each file once. A bad file raises
  DataError "file:line: media path: problem" (with skip_bad_rows the row is dropped and
  counted as "bad_media"). The tensors stay in memory for the run: ~4.7 MB per 448x448
  image (float32 patches, each image doubled in time), ~51 KB per second of audio.
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
      + "\n\n" + REFERENCE_WRAPPER with the reference answer, if teacher_sees_reference;
  with teacher_sees_transcript, each image/audio/video in the teacher's turns is replaced by
  (or, "add", followed by) the row's caption / transcript text (MEDIA_AS_TEXT): the teacher
  reads what the student hears and sees.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import media


class DataError(ValueError):
    """A problem with the data or the dataset specs.

    `reason` is a short key ("malformed_json", "missing_field", ...) under which a skipped
    row is counted when skip_bad_rows=True.
    """

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


SAMPLE_DATASET = Path(__file__).resolve().parent / "data" / "sample_alpaca.jsonl"


# Appended (after a blank line) to the teacher's last user turn when teacher_sees_reference
# is on: the teacher is shown the dataset answer, the student is not (OPSD-style).
CHAT_ROLES = ("system", "user", "assistant")

REFERENCE_WRAPPER = (
    "Here is a reference answer:\n{reference}\n"
    "After reading the reference answer, write your own answer to the request above."
)


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


_UTF8_BOM = b"\xef\xbb\xbf"


MEDIA_KINDS = ("image", "audio", "video")


@dataclass(eq=False)  # compared by identity: one object per file, shared by the rows that use it
class Media:
    """One preprocessed media item (load_media): what the model's towers will get for it.

    image: pixels [gh*gw, 1536], grid_thw (1, gh, gw).
    audio: features [128, frames] (log-mel, 100 frames per second).
    video: pixels [gt*gh*gw, 1536], grid_thw (gt, gh, gw), second_per_grid; with audio in
        video also features: its sound track, whose tokens interleave with the frames'.
    """

    kind: str  # "image", "audio" or "video"
    path: str  # the file (a video given as frames: the first frame's path and the count)
    pixels: torch.Tensor | None = None
    grid_thw: tuple[int, int, int] | None = None
    second_per_grid: float | None = None
    features: torch.Tensor | None = None
    seconds: float = 0.0  # playing time of a clip or video, for logs
    samples: int = 0  # length of the sound (a clip, or a video's track) at 16 kHz

    @property
    def n_vision_tokens(self) -> int:
        """Placeholders of the picture: <|image_pad|> or <|video_pad|> tokens (0 for audio)."""
        return media.vision_token_count(self.grid_thw) if self.grid_thw else 0

    @property
    def n_audio_tokens(self) -> int:
        """Placeholders of the sound: <|audio_pad|> tokens (a clip, or a video's own track)."""
        return media.audio_token_count(self.features.shape[1]) if self.features is not None else 0


@dataclass
class Example:
    student_messages: list[dict]  # prompt turns: optional system, history, final user turn
    teacher_messages: list[dict]  # the same turns plus the privileged context
    completion: str  # the last assistant turn: the reference answer
    source: str  # "path:line", for errors and logs
    # A turn's content is a string, or (a turn with media) a list of parts {"type": "text",
    # "text": ...} / {"type": kind, kind: path} with paths resolved (a video may be a list of
    # frame paths); `media` maps media_key(part) to the preprocessed item, for both prompts.
    media: dict = field(default_factory=dict)
    use_audio_in_video: bool = False  # the row's videos bring their sound tracks
    caption: str | list[str] | None = None  # what the row's pictures show (privileged text)
    transcript: str | list[str] | None = None  # what its sounds say (privileged text)


def media_key(part: dict) -> tuple:
    """(kind, path) of a media part; a video given as frames: (kind, tuple of paths)."""
    value = part[part["type"]]
    return part["type"], value if isinstance(value, str) else tuple(value)


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
        content = item.get(text_key)
        if not isinstance(content, list):  # a content list (text and media parts) is read by _media_turns
            content = _string_field(item, text_key, f"{source}: {field}", required=True)
        if role not in roles:
            raise DataError(
                f"{source}: field '{field}.{role_key}': unsupported role {role!r}, expected one of {', '.join(roles)}",
                "bad_conversation",
            )
        turns.append({"role": roles[role], "content": content})
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
    """The student's turns (or the row's teacher_messages) with the privileged context added
    (rule in the module docstring). A final turn with media gets the text after its parts."""
    teacher = [dict(message) for message in student]
    has_system = teacher[0]["role"] == "system"
    own_system = teacher[0]["content"] if has_system else None
    system = "\n\n".join(part for part in [own_system, *system_parts] if part)
    if has_system:
        teacher[0]["content"] = system
    elif system:
        teacher.insert(0, {"role": "system", "content": system})
    content, extra = teacher[-1]["content"], [part for part in user_parts if part]
    if isinstance(content, str):
        teacher[-1]["content"] = "\n\n".join(part for part in [content, *extra] if part)
    elif extra:
        teacher[-1]["content"] = _joined(content + [{"type": "text", "text": "\n\n" + "\n\n".join(extra)}])
    return teacher


# --- media in rows ---------------------------------------------------------------------------
_MEDIA_TAG = re.compile(r"<(image|audio|video)>")  # ms-swift's tags; the split keeps the kind


_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|audio_pad|>")


def _media_path(value, kind: str, base_dir: str, where: str):
    """A media reference -> its path joined to the dataset file's folder (absolute paths stay);
    a video may be a list of frame image paths."""
    if kind == "video" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_media_path(v, "image", base_dir, where) for v in value]
    if not isinstance(value, str) or not value:
        frames = " or a list of frame image paths" if kind == "video" else ""
        raise DataError(f"{where}: expected the {kind}'s file path{frames}, got {_type_name(value)}", "wrong_type")
    if "://" in value:
        raise DataError(f"{where}: {value}: selfkd reads local files only; download it and give its path "
                        "(relative to the dataset file, or absolute)", "bad_media")
    return os.path.normpath(os.path.join(base_dir, value))


def _media_lists(row: dict, source: str, base_dir: str) -> dict | None:
    """The row's ms-swift lists {kind: [path, ...]} (paths resolved), or None if it has none."""
    if all(row.get(kind + "s") is None for kind in MEDIA_KINDS):
        return None
    lists = {}
    for kind in MEDIA_KINDS:
        key, entries = kind + "s", row.get(kind + "s")
        entries = [] if entries is None else [entries] if isinstance(entries, str) else entries
        if not isinstance(entries, list):
            raise DataError(f"{source}: field '{key}': expected an array of paths, got {_type_name(entries)}",
                            "wrong_type")
        lists[kind] = [_media_path(v, kind, base_dir, f"{source}: field '{key}[{i}]'") for i, v in enumerate(entries)]
    return lists


def _joined(parts: list[dict]) -> str | list[dict]:
    """Parts -> a string if they are all text, else the parts with adjacent texts merged."""
    merged = []
    for part in parts:
        if part["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        elif part["type"] != "text" or part["text"]:
            merged.append(part)
    if all(part["type"] == "text" for part in merged):
        return "".join(part["text"] for part in merged)
    return merged


def _content_parts(content, queues: dict | None, base_dir: str, where: str) -> list[dict]:
    """One turn's content (a string or a content list) -> its parts in order: text, and media
    with resolved paths. `queues` hands out the row's list entries to the tags; None: no tags."""
    items = [{"type": "text", "text": content}] if isinstance(content, str) else content
    parts = []
    for j, item in enumerate(items):
        at = where if isinstance(content, str) else f"{where}.content[{j}]"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise DataError(f"{at}: field 'text': expected string, got {_type_name(text)}", "wrong_type")
            for placeholder in _PLACEHOLDERS:
                if placeholder in text:
                    raise DataError(f"{at}: the text holds {placeholder}, which only media may bring; put an "
                                    "<image>/<audio>/<video> tag or a media part where the item goes", "bad_media")
            pieces = [text] if queues is None else _MEDIA_TAG.split(text)
            for k, piece in enumerate(pieces):  # odd k: a tag's kind
                parts.append({"type": piece, piece: next(queues[piece])} if k % 2 else {"type": "text", "text": piece})
        elif kind in MEDIA_KINDS:
            value = item.get(kind, item.get("path"))
            parts.append({"type": kind, kind: _media_path(value, kind, base_dir, at)})
        else:
            raise DataError(f"{at}: expected a part {{\"type\": \"text\" | \"image\" | \"audio\" | \"video\", ...}}, "
                            f"got {json.dumps(item, ensure_ascii=False)[:80]}", "wrong_type")
    return parts


def _media_turns(turns: list[dict], lists: dict | None, base_dir: str, where: str, exact: bool) -> list[dict]:
    """Turns with their content read for media (rules in the module docstring): a text-only
    turn's content becomes a string, a turn with media a list of parts.

    lists: the row's ms-swift lists, or None (then tags are plain text). exact: every entry
    must have its tag (the conversation); else the tags may take fewer (teacher_messages).
    """
    queues = None
    if lists is not None:
        texts = [t["content"] for t in turns if isinstance(t["content"], str)] + [
            p.get("text", "") for t in turns if isinstance(t["content"], list) for p in t["content"]
            if isinstance(p, dict) and isinstance(p.get("text"), str)]
        for kind in MEDIA_KINDS:
            tags, entries = sum(text.count(f"<{kind}>") for text in texts), lists[kind]
            if tags > len(entries) or (exact and tags < len(entries)):
                named = f" ({', '.join(map(str, entries))})" if entries else ""
                raise DataError(f"{where}: {tags} <{kind}> tag(s) in the text but {len(entries)} entries in "
                                f"'{kind}s'{named}; each tag marks where the next entry goes", "bad_media")
        queues = {kind: iter(lists[kind]) for kind in MEDIA_KINDS}
    out = []
    for i, turn in enumerate(turns):
        parts = _content_parts(turn["content"], queues, base_dir, f"{where}[{i}]")
        if turn["role"] != "user" and any(part["type"] != "text" for part in parts):
            raise DataError(f"{where}[{i}]: the {turn['role']} turn holds media; images, audio and video may only "
                            "appear in user turns", "bad_media")
        out.append({"role": turn["role"], "content": _joined(parts)})
    return out


def _texts_field(row: dict, key: str, source: str) -> str | list[str] | None:
    """`caption` / `transcript`: a string, or a list of strings (one per item)."""
    value = row.get(key)
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise DataError(f"{source}: field '{key}': expected string or array of strings, got {_type_name(value)}",
                    "wrong_type")


def _teacher_turns(row: dict, lists: dict | None, base_dir: str, source: str) -> list[dict] | None:
    """The row's own `teacher_messages` (prompt turns, ending with a user turn), or None."""
    if row.get("teacher_messages") is None:
        return None
    turns = _list_turns(row, "teacher_messages", "role", "content", {r: r for r in CHAT_ROLES}, source)
    turns = _media_turns(turns, lists, base_dir, f"{source}: teacher_messages", exact=False)
    roles = [turn["role"] for turn in turns]
    if not roles or roles[-1] != "user" or "system" in roles[1:]:
        raise DataError(f"{source}: field 'teacher_messages': the teacher's prompt turns must end with a user turn "
                        f"(a system message only first); roles seen: {roles}", "bad_conversation")
    return turns


# How the teacher reads a media item it does not hear or see (--teacher_sees_transcript): the
# row's `caption` (images, videos) or `transcript` (audio; a video's sound with use_audio_in_video).
MEDIA_AS_TEXT = {"image": "(Image: {})", "video": "(Video: {})", "audio": "(Audio transcript: {})"}


TEACHER_SEES_TRANSCRIPT = ("false", "true", "add")  # true: the text replaces the media; add: both


def _media_as_text(turns: list[dict], caption, transcript, use_audio_in_video: bool, mode: str,
                   source: str) -> list[dict]:
    """The teacher's turns with each media item replaced by (mode "true") or followed by (mode
    "add") the text of what it shows or says. Captions are taken in order by the pictures
    (images and videos), transcripts by the sounds (audio clips, and videos' sound tracks when
    use_audio_in_video): a list gives one per item, a string serves every item."""
    texts = {"caption": caption, "transcript": transcript}
    used = {"caption": 0, "transcript": 0}

    def take(field_name: str, kind: str) -> str:
        value = texts[field_name]
        if isinstance(value, list):
            if used[field_name] >= len(value):
                raise DataError(f"{source}: --teacher_sees_transcript: the row has more {kind} items than "
                                f"'{field_name}' entries ({len(value)})", "missing_field")
            value = value[used[field_name]]
        if value is None:
            raise DataError(f"{source}: --teacher_sees_transcript: the row has {'an' if kind[0] in 'aeiou' else 'a'} "
                            f"{kind} but no '{field_name}' field to show the teacher instead", "missing_field")
        used[field_name] += 1
        return value

    out = []
    for turn in turns:
        if isinstance(turn["content"], str):
            out.append(turn)
            continue
        parts = []
        for part in turn["content"]:
            if part["type"] == "text":
                parts.append(part)
                continue
            kind = part["type"]
            said = [MEDIA_AS_TEXT[kind].format(take("transcript" if kind == "audio" else "caption", kind))]
            if kind == "video" and use_audio_in_video and transcript is not None:
                said.append(MEDIA_AS_TEXT["audio"].format(take("transcript", "video's sound")))
            parts += ([part] if mode == "add" else []) + [{"type": "text", "text": " ".join(said)}]
        out.append({"role": turn["role"], "content": _joined(parts)})
    return out


def _parse_row(
    row, source: str, teacher_system: str | None, teacher_sees_reference: bool, base_dir: str = ".",
    teacher_sees_transcript: str = "false",
) -> tuple[str, Example]:
    """(format name, Example) for one row; raises DataError naming the source. Media paths are
    joined to base_dir (the dataset file's folder); the media themselves are not read here."""
    if not isinstance(row, dict):
        raise DataError(f"{source}: a row must be a JSON object, got {_type_name(row)}", "wrong_type")
    if "messages" in row:
        fmt, key = "messages", "messages"
        turns = _list_turns(row, "messages", "role", "content", {r: r for r in CHAT_ROLES}, source)
    elif "conversations" in row:
        fmt, key = "sharegpt", "conversations"
        turns = _list_turns(row, "conversations", "from", "value", _SHAREGPT_ROLES, source)
    elif row.keys() & {"instruction", "input", "output"}:
        fmt, key = "alpaca", "turns"
        turns = _alpaca_turns(row, source)
    else:
        raise DataError(
            f"{source}: unknown row format; keys seen: {sorted(row)}; expected alpaca "
            "(instruction/input/output), OpenAI 'messages' or ShareGPT 'conversations'",
            "unknown_format",
        )
    lists = _media_lists(row, source, base_dir)
    turns = _media_turns(turns, lists, base_dir, f"{source}: {key}", exact=True)
    _check_conversation(turns, source)
    student, completion = turns[:-1], turns[-1]["content"]
    use_audio_in_video = row.get("use_audio_in_video", False)
    if not isinstance(use_audio_in_video, bool):
        raise DataError(f"{source}: field 'use_audio_in_video': expected boolean, got {_type_name(use_audio_in_video)}",
                        "wrong_type")
    row_teacher_system = _string_field(row, "teacher_system", source, required=False)
    teacher_context = _string_field(row, "teacher_context", source, required=False)
    reference = REFERENCE_WRAPPER.format(reference=completion) if teacher_sees_reference else None
    caption, transcript = _texts_field(row, "caption", source), _texts_field(row, "transcript", source)
    base = _teacher_turns(row, lists, base_dir, source) or student
    if teacher_sees_transcript != "false":
        base = _media_as_text(base, caption, transcript, use_audio_in_video, teacher_sees_transcript, source)
    teacher = _teacher_messages(base, [teacher_system, row_teacher_system], [teacher_context, reference])
    return fmt, Example(student, teacher, completion, source, use_audio_in_video=use_audio_in_video,
                        caption=caption, transcript=transcript)


# --- media: read and preprocessed once -----------------------------------------------------
def load_media(kind: str, source, use_audio_in_video: bool = False) -> Media:
    """Read and preprocess one media item with media.py -> Media.

    source: a file path; a video may also be a list of frame image paths (taken as sampled at
    2 fps). use_audio_in_video: a video also brings its sound track (it must have one).
    Raises media.MediaError naming the file, or ImportError naming the package to install.
    """
    if kind == "image":
        pixels, grid = media.image_patches(media.load_image(source), name=source)
        return Media("image", source, pixels=pixels, grid_thw=grid)
    if kind == "audio":
        wave = media.load_audio(source)
        return Media("audio", source, features=media.log_mel(wave), seconds=len(wave) / media.SAMPLING_RATE,
                     samples=len(wave))
    video = media.load_video(source)
    name = source if isinstance(source, str) else f"{source[0]} (+{len(source) - 1} frames)"
    pixels, grid, second_per_grid = media.video_patches(video.frames, video.fps, name=name)
    features = None
    if use_audio_in_video:
        if not isinstance(source, str):
            raise media.MediaError(name, "use_audio_in_video is set, but a video given as frames has no sound track")
        wave = media.load_audio_from_video(source)
        if wave is None:
            raise media.MediaError(source, "use_audio_in_video is set, but the video has no audio stream")
        features = media.log_mel(wave)
    return Media("video", name, pixels=pixels, grid_thw=grid, second_per_grid=second_per_grid, features=features,
                 seconds=len(video.frames) / video.fps, samples=0 if features is None else len(wave))


def _attach_media(ex: Example, cache: dict) -> None:
    """Fill ex.media for every media part of its prompts; `cache` shares items between rows."""
    for message in ex.student_messages + ex.teacher_messages:
        for part in [] if isinstance(message["content"], str) else message["content"]:
            if part["type"] == "text":
                continue
            key, with_sound = media_key(part), part["type"] == "video" and ex.use_audio_in_video
            if (key, with_sound) not in cache:
                try:
                    cache[key, with_sound] = load_media(part["type"], part[part["type"]], with_sound)
                except media.MediaError as error:
                    raise DataError(f"{ex.source}: {error}", "bad_media") from None
                except ImportError as error:  # a missing package is no bad row: never skipped
                    raise DataError(f"{ex.source}: {error}", "missing_package") from None
            ex.media[key] = cache[key, with_sound]
    try:
        _pad_row_clips(ex)
    except media.MediaError as error:
        raise DataError(f"{ex.source}: {error}", "bad_media") from None


def _pad_row_clips(ex: Example) -> None:
    """A row whose sounds (clips, and video tracks with use_audio_in_video) differ in length gets
    the features one processor call gives them, as ms-swift hands all of a row's sounds to the
    processor at once: padded to the row's longest (media.log_mel_row), so a shorter clip may get
    one more frame and token than alone. The row gets its own copies of those items; the shared,
    cached ones keep the features of each clip alone. The sounds are decoded a second time here
    (the cache keeps features, not waveforms, which would double its memory), for such rows only."""
    sounds = [(key, item) for key, item in ex.media.items() if item.features is not None]
    if len({item.samples for _, item in sounds}) < 2:
        return
    waves = [media.load_audio(item.path) if item.kind == "audio" else media.load_audio_from_video(item.path)
             for _, item in sounds]
    for (key, item), features in zip(sounds, media.log_mel_row(waves)):
        ex.media[key] = replace(item, features=features)


def _read_media(examples: list[Example], indices: set[int], cache: dict, stats: dict | None,
                errors: list | None = None) -> set[int]:
    """Preprocess the media of the drawn rows examples[i], i in indices. Returns the rows whose
    media are bad, counted in `stats` (skip_bad_rows); with stats None they go to `errors` (or,
    with no list, the first one raises). A missing package always raises: it is no bad row."""
    bad = set()
    for i in sorted(indices):
        try:
            _attach_media(examples[i], cache)
        except DataError as error:
            if error.reason == "missing_package" or (stats is None and errors is None):
                raise
            bad.add(i)
            if stats is None:
                errors.append(error)
                continue
            stats["rows_skipped"][error.reason] += 1
            stats["bad_rows"].append(str(error))
    return bad


MAX_BAD_ROWS_SHOWN = 20


def bad_rows_error(errors: list[DataError], rows_read: int) -> DataError:
    """Every bad row in one error: a line each (file:line: what is wrong), up to MAX_BAD_ROWS_SHOWN,
    then a count, and a last line with the two ways on."""
    shown = [str(error) for error in errors[:MAX_BAD_ROWS_SHOWN]]
    if len(errors) > len(shown):
        shown.append(f"... and {len(errors) - len(shown)} more bad rows")
    shown.append(f"{len(errors)} of {rows_read} rows are bad: fix them, or pass --skip_bad_rows true to train without "
                 "them (each skipped row is then named in the log)")
    return DataError("\n".join(shown), errors[0].reason)


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
    teacher_sees_transcript: str = "false",
) -> tuple[list[Example], list[Example], dict]:
    """Load 'path' / 'path#N' specs into (train, eval, stats).

    Specs are concatenated in order; one numpy RandomState(seed), used spec after spec,
    makes the sampling and the eval split reproducible. With skip_bad_rows, a bad row is
    dropped, counted in stats["rows_skipped"][reason] and described in stats["bad_rows"];
    without it, the first bad row raises DataError. The media of the drawn rows are read and
    preprocessed here (rules in the module docstring), so a bad file shows before any
    model is loaded.
    """
    if not specs:
        raise DataError("no dataset specs given")
    if not 0 <= split_ratio < 1:
        raise DataError(f"split_ratio must be in [0, 1), got {split_ratio}")
    rng = np.random.RandomState(seed)
    train, evaluation, media_cache = [], [], {}
    bad_rows = []  # without skip_bad_rows: every bad row of every spec, reported together at the end
    stats = {"specs": [], "rows_read": 0, "rows_skipped": Counter(), "bad_rows": [], "formats": Counter()}
    for spec in specs:
        path, n_sample = _parse_spec(spec)
        examples = []
        rows = _read_rows(path)
        for line, row in rows:
            try:
                if isinstance(row, DataError):
                    raise row
                fmt, example = _parse_row(row, f"{path}:{line}", teacher_system, teacher_sees_reference,
                                          base_dir=os.path.dirname(path),
                                          teacher_sees_transcript=teacher_sees_transcript)
            except DataError as error:
                if not skip_bad_rows:
                    bad_rows.append(error)
                    continue
                stats["rows_skipped"][error.reason] += 1
                stats["bad_rows"].append(str(error))
                continue
            stats["formats"][fmt] += 1
            examples.append(example)
        stats["rows_read"] += len(rows)
        if not examples:
            if bad_rows:
                continue
            why = f"all {len(rows)} rows were bad and skipped" if rows else "the file holds no rows"
            raise DataError(f"{path}: no usable rows: {why}", "empty_dataset")
        try:
            train_idx, eval_idx = _split_and_sample(len(examples), n_sample, split_ratio, rng, spec)
        except DataError:
            if bad_rows:  # too few rows because some are bad: those are the error, reported below
                continue
            raise
        bad = _read_media(examples, set(train_idx + eval_idx), media_cache, stats if skip_bad_rows else None,
                          bad_rows)
        if bad:  # drawn rows whose media are bad (skip_bad_rows): dropped, so the spec gives fewer rows
            train_idx, eval_idx = [i for i in train_idx if i not in bad], [i for i in eval_idx if i not in bad]
            if not train_idx and skip_bad_rows:  # (without it, bad_rows_error below names them)
                raise DataError(f"{path}: no usable rows: the media of every drawn training row are bad", "empty_dataset")
        train += [examples[i] for i in train_idx]
        evaluation += [examples[i] for i in eval_idx]
        stats["specs"].append({
            "spec": spec, "rows_read": len(rows), "rows_usable": len(examples) - len(bad),
            "train": len(train_idx), "eval": len(eval_idx),
        })
    if bad_rows:
        raise bad_rows_error(bad_rows, stats["rows_read"])
    stats["train"], stats["eval"] = len(train), len(evaluation)
    # With no privileged context the teacher equals the student and GKD cannot move (the
    # fixed point, README); the trainer warns when this is 0.
    stats["teacher_differs"] = sum(e.teacher_messages != e.student_messages for e in train)
    return train, evaluation, stats


if __name__ == "__main__":  # `python data.py inspect ...`: the tool lives in inspect_data.py
    from inspect_data import main

    main()
