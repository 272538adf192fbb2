"""`python data.py inspect DATASET`: what every row of a dataset becomes before any training: its
media (shapes, grids, seconds, placeholder counts), the student's and the teacher's prompts with
the placeholder runs abbreviated, the completion; with --model, the token ids as training cuts them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import media
from chat import MEDIA_TOKENS, ChatTokenizer, EncodedExample, _chat_pieces, encode_example, load_tokenizer, media_span
from data import DataError, Example, Media, _attach_media, _parse_row, _parse_spec, _read_rows, media_key


_PAD_RUN = re.compile(r"(<\|(?:image|video|audio)_pad\|>)\1*")


def abbreviate_placeholders(text: str) -> str:
    """Each run of one placeholder written once with its count: '<|image_pad|>x36'."""
    return _PAD_RUN.sub(lambda m: f"{m.group(1)}x{len(m.group(0)) // len(m.group(1))}", text)


def render_prompt(messages: list[dict], items: dict) -> str:
    """A prompt as text (generation header included), each media item written out as the
    processor expands it; abbreviate_placeholders makes it readable."""
    as_text = {token: token for token in MEDIA_TOKENS}  # media_span with the tokens themselves for ids
    return "".join(piece if isinstance(piece, str) else "".join(media_span(items[media_key(piece)], as_text))
                   for piece in _chat_pieces(messages, add_generation_prompt=True))


def describe_media(item: Media) -> str:
    """One line: what the towers get for a media item, and its placeholder count."""
    if item.kind == "audio":
        return (f"audio {item.path}: {item.seconds:.2f} s, input_features {list(item.features.shape)} "
                f"-> {item.n_audio_tokens} <|audio_pad|>")
    t, gh, gw = item.grid_thw
    size = f"{gw * media.PATCH_SIZE}x{gh * media.PATCH_SIZE}"
    if item.kind == "image":
        return (f"image {item.path}: resized to {size}, grid {t}x{gh}x{gw}, pixel_values {list(item.pixels.shape)} "
                f"-> {item.n_vision_tokens} <|image_pad|>")
    line = (f"video {item.path}: {item.seconds:.2f} s, frames resized to {size}, grid {t}x{gh}x{gw} "
            f"({item.second_per_grid:g} s per grid), pixel_values_videos {list(item.pixels.shape)} "
            f"-> {item.n_vision_tokens} <|video_pad|>")
    if item.features is not None:
        line += (f"; its sound: input_features {list(item.features.shape)} -> {item.n_audio_tokens} <|audio_pad|> "
                 "interleaved with the frames")
    return line


def _describe_example(ex: Example, fmt: str, tok: ChatTokenizer | None, enc: EncodedExample | None) -> list[str]:
    def prompt(messages, ids, what):
        if ids is None:
            return [f"  {what}:"] + ["    " + line for line in abbreviate_placeholders(
                render_prompt(messages, ex.media)).splitlines()]
        return [f"  {what}, {len(ids)} tokens:"] + [
            "    " + line for line in abbreviate_placeholders(tok.decode(ids)).splitlines()]

    flags = ", use_audio_in_video" if ex.use_audio_in_video else ""
    lines = [f"{ex.source}  ({fmt}{flags})"]
    lines += [f"  {describe_media(item)}" for item in dict.fromkeys(ex.media.values())]
    lines += prompt(ex.student_messages, enc and enc.student_prompt_ids, "student prompt")
    if ex.teacher_messages == ex.student_messages:
        lines.append("  teacher prompt: the student's")
    else:
        lines += prompt(ex.teacher_messages, enc and enc.teacher_prompt_ids, "teacher prompt")
    size = f", {len(enc.completion_ids)} tokens" if enc else ""
    lines.append(f"  completion{size}: {ex.completion}")
    lines += [f"  {key}: {value}" for key, value in (("caption", ex.caption), ("transcript", ex.transcript)) if value]
    return lines


def inspect_dataset(
    spec: str,
    tok: ChatTokenizer | None = None,
    rows: int | None = 10,
    max_length: int = 2048,
    max_completion_length: int = 512,
    teacher_system: str | None = None,
    teacher_sees_reference: bool = False,
) -> str:
    """What the first `rows` rows of a dataset file become (file order, no sampling), as text:
    the media (shapes, grids, seconds, placeholder counts), the rendered student and teacher
    prompts with placeholder runs abbreviated ('<|image_pad|>x36') and the completion. With a
    tokenizer the prompts are the decoded ids, truncated to max_length as training does. A bad
    row gets its error line instead. Nothing but the tokenizer and the media is loaded.
    """
    path, _ = _parse_spec(spec)
    lines, cache = [], {}
    for line, row in _read_rows(path)[:rows]:
        try:
            if isinstance(row, DataError):
                raise row
            fmt, ex = _parse_row(row, f"{path}:{line}", teacher_system, teacher_sees_reference, os.path.dirname(path))
            _attach_media(ex, cache)
            enc = encode_example(tok, ex, max_length, max_completion_length) if tok else None
        except DataError as error:
            lines += [f"{error}  (skipped: {error.reason})", ""]
            continue
        lines += _describe_example(ex, fmt, tok, enc) + [""]
    return "\n".join(lines)


def main():
    """`python data.py inspect DATASET [--model DIR] ...` (or `python inspect_data.py inspect ...`)."""
    parser = argparse.ArgumentParser(prog="python data.py", description="What selfkd makes of a dataset.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print the first rows as the trainer will see them")
    inspect.add_argument("dataset", help="a .jsonl / .json dataset file")
    inspect.add_argument("--model", help="checkpoint directory: its tokenizer counts and truncates the prompts")
    inspect.add_argument("--rows", type=int, default=10, help="how many rows, from the top (default 10)")
    inspect.add_argument("--max_length", type=int, default=2048)
    inspect.add_argument("--max_completion_length", type=int, default=512)
    inspect.add_argument("--teacher_system", help="run-wide extra system prompt for the teacher")
    inspect.add_argument("--teacher_sees_reference", action="store_true", help="show the teacher the answer")
    args = parser.parse_args()
    try:
        print(inspect_dataset(args.dataset, load_tokenizer(args.model) if args.model else None, args.rows,
                              args.max_length, args.max_completion_length, args.teacher_system,
                              args.teacher_sees_reference))
    except (DataError, OSError) as error:
        sys.exit(f"data.py: error: {error}")


if __name__ == "__main__":
    main()
