"""Chat for selfkd: the tokenizer, the chat format, Examples into token ids, and batches.

Read top to bottom; each section builds on the one before:

1. Tokenizer    -- a Qwen2Tokenizer built from `tokenizers` alone (no transformers at runtime).
2. Chat format  -- Qwen3-Omni text-only ChatML (the embedded default's tokenizer is tiny.py's).
3. Encoding     -- token ids with the media placeholders expanded, plus the truncation rule.
4. Batches      -- padding, where each completion starts, and the batch's media for the model.

The rows come from data.py (datasets -> Examples). Rules this module chooses:

* Special-token strings in text: we do what transformers' Qwen2Tokenizer does, because the
  aim is to see exactly the token ids the model was trained with. A literal "<|im_end|>"
  inside a user message therefore becomes the control token, i.e. a row can inject
  ChatML structure. Clean the data if that matters; we do not escape it. The exception are
  the placeholders <|image_pad|>, <|video_pad|>, <|audio_pad|>: the model replaces each one
  with a piece of a media item, so a row whose text holds one is refused ("bad_media").
* Truncation (encode_example): the completion (text + <|im_end|>) is cut to
  max_completion_length tokens; a cut completion keeps no <|im_end|>, so the model is never
  taught to stop mid-answer. Then each prompt (student and teacher alike) keeps its LAST
  max_length - len(completion) tokens: the system prompt and the oldest turns go first,
  as in ms-swift's truncation_strategy 'left'. If even the final user turn plus the
  assistant header does not fit, the row is skipped and counted (or, with no stats dict
  to count it in, it raises): a prompt without its question would teach nothing. Media
  are never cut: a span of placeholders that the cut would split goes whole, and a final
  user turn whose media do not fit skips the row like any final turn that does not fit.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

import media
from data import CHAT_ROLES, DataError, Example, Media, REFERENCE_WRAPPER, media_key
from model_qwen3omni import MediaInputs


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
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # max id + 1, not a count: the embedding matrix must cover every id.
        self.vocab_size = max(vocab.values()) + 1
        # The most bytes of text one token can stand for: a byte-level BPE token's string has a
        # character per byte it stands for (and UTF-8 needs at least a byte per character); an
        # added token is its own text.
        self.max_token_bytes = max(len(token.encode()) for token in vocab)

    def _id_of(self, token: str, source: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{source}: the tokenizer has no {token!r} token; is this a Qwen tokenizer?")
        return token_id

    def encode(self, text: str) -> list[int]:
        # No BOS and no post-processing, as Qwen2Tokenizer; added tokens inside `text` are
        # matched as tokens (see the module docstring).
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), without encoding: ceil(bytes of the normalized text /
        max_token_bytes). A 10 MB row is found too long for --max_length in a fraction of a second
        instead of the ~10 s its encoding takes."""
        normalizer = self.tokenizer.normalizer
        text = normalizer.normalize_str(text) if normalizer is not None else text
        return -(-len(text.encode()) // self.max_token_bytes)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def readable(self, ids) -> str:
        """Text of ids (special tokens left out) where an id the vocabulary lacks shows as <id>
        instead of vanishing: a tokenizer may cover fewer ids than the model's embedding has rows."""
        out, run = [], []
        for i in map(int, ids):
            if self.tokenizer.id_to_token(i) is None:
                out += [self.decode(run, skip_special_tokens=True), f"<{i}>"]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.decode(run, skip_special_tokens=True)])


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


# ---------------------------------------------------------------------------------------------
# 3. Encoding and truncation
# ---------------------------------------------------------------------------------------------


@dataclass
class EncodedExample:
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    completion_ids: list[int]  # ends with <|im_end|> unless the completion was truncated
    student_media: list[Media] = field(default_factory=list)  # the student prompt's media, in prompt order
    teacher_media: list[Media] = field(default_factory=list)  # the teacher prompt's (may differ)


def reads_the_media(e: EncodedExample) -> bool:
    """Whether the student hears or sees media that the teacher gets otherwise (--teacher_sees_transcript
    true, teacher_messages): a cross-modal row, whose divergence is the cross-modal gap."""
    return bool(e.student_media) and e.teacher_media != e.student_media and e.teacher_prompt_ids != e.student_prompt_ids


# The media markers and placeholders, as the chat template writes them and the processor expands them.
MEDIA_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>")


def media_token_ids(tok: ChatTokenizer) -> dict[str, int]:
    """{token: id} for MEDIA_TOKENS (151652, 151653, 151655, 151656, 151669, 151670, 151675 in
    the released tokenizer)."""
    ids = {token: tok.tokenizer.token_to_id(token) for token in MEDIA_TOKENS}
    missing = [token for token, token_id in ids.items() if token_id is None]
    if missing:
        raise DataError(f"the tokenizer has no {', '.join(missing)} token: media rows need the Qwen3-Omni tokenizer",
                        "missing_token")
    return ids


def media_span(item: Media, ids: dict[str, int]) -> list[int]:
    """The token ids of one media item, exactly as the released processor expands it:

        image           <|vision_start|> <|image_pad|> x N <|vision_end|>      N = gh*gw/4
        audio           <|audio_start|> <|audio_pad|> x N <|audio_end|>        N = audio_token_count(frames)
        video           <|vision_start|> <|video_pad|> x N <|vision_end|>      N = gt*gh*gw/4
        audio in video  <|vision_start|> <|audio_start|> V.. A.. V.. A.. <|audio_end|> <|vision_end|>

    where V.. and A.. are runs of <|video_pad|> and <|audio_pad|> in time order
    (media.interleave_audio_in_video): each 2-frame slice, then the sound until the next one.
    """
    vs, ve, as_, ae = (ids[t] for t in ("<|vision_start|>", "<|vision_end|>", "<|audio_start|>", "<|audio_end|>"))
    if item.kind == "image":
        return [vs] + [ids["<|image_pad|>"]] * item.n_vision_tokens + [ve]
    if item.kind == "audio":
        return [as_] + [ids["<|audio_pad|>"]] * item.n_audio_tokens + [ae]
    if item.features is None:
        return [vs] + [ids["<|video_pad|>"]] * item.n_vision_tokens + [ve]
    pad = {"V": ids["<|video_pad|>"], "A": ids["<|audio_pad|>"]}
    runs = media.interleave_audio_in_video(item.grid_thw, item.second_per_grid, item.n_audio_tokens)
    return [vs, as_] + [pad[kind] for kind, count in runs for _ in range(count)] + [ae, ve]


def _encode_turns(
    tok: ChatTokenizer, messages: list[dict], items: dict, add_generation_prompt: bool = False
) -> tuple[list[int], list[tuple[int, int, Media]]]:
    """(ids, media spans [(start, end, item)]) of ChatML turns; `items` is Example.media.

    Text-only turns give exactly tok.encode(render_chat(messages, add_generation_prompt)). A
    turn with media renders its parts in order, no separators (the chat template's rule): the
    text so far is encoded and the item's placeholder ids appended. Every span starts and ends
    with an added token, where the tokenizer splits the text anyway, so the ids equal those of
    the processor's expanded prompt string encoded at once, without building that string.
    """
    ids, spans, text, token_ids = [], [], "", None
    for piece in _chat_pieces(messages, add_generation_prompt):
        if isinstance(piece, str):
            text += piece
            continue
        token_ids = token_ids or media_token_ids(tok)
        item = items[media_key(piece)]
        ids += tok.encode(text)
        text = ""
        span = media_span(item, token_ids)
        spans.append((len(ids), len(ids) + len(span), item))
        ids += span
    return ids + tok.encode(text), spans


def encode_prompt(tok: ChatTokenizer, messages: list[dict], items: dict) -> tuple[list[int], list[Media]]:
    """A prompt to answer (generation header included) -> (ids with the media placeholders expanded,
    its media items in prompt order); `items` maps media_key(part) to the item, {} for text."""
    ids, spans = _encode_turns(tok, messages, items, add_generation_prompt=True)
    return ids, [item for _, _, item in spans]


def _chat_pieces(messages: list[dict], add_generation_prompt: bool):
    """ChatML turns in order as text pieces (str) and media parts (dict): a string content is
    rendered whole, a content list part by part with no separators (the chat template's rule)."""
    for message in messages:
        if isinstance(message["content"], str):
            yield render_chat([message])
            continue
        yield f"<|im_start|>{message['role']}\n"
        for part in message["content"]:
            yield part["text"] if part["type"] == "text" else part
        yield "<|im_end|>\n"
    yield render_chat([], add_generation_prompt=add_generation_prompt)


def _text_of(message: dict) -> str:
    """A message's text (a content list's text parts, joined)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def _fit_prompt(
    tok: ChatTokenizer, messages: list[dict], items: dict, budget: int
) -> tuple[list[int], bool, list[Media]] | None:
    """(prompt ids, truncated?, its media in prompt order) keeping at most `budget` tokens from
    the left, or None when the final user turn plus the assistant header alone exceed the budget.

    Every turn starts with the <|im_start|> token, so encoding the history and the final turn
    apart gives exactly the ids of the whole prompt, and tells us how long the final turn is.
    A cut inside a media span moves right, past the span: an item goes whole or not at all.
    """
    if tok.min_tokens(_text_of(messages[-1])) > budget:  # cannot fit whatever its exact length: not encoded
        return None
    head, head_spans = _encode_turns(tok, messages[:-1], items)
    tail, tail_spans = _encode_turns(tok, messages[-1:], items, add_generation_prompt=True)
    if len(tail) > budget:
        return None
    ids = head + tail
    spans = head_spans + [(start + len(head), end + len(head), item) for start, end, item in tail_spans]
    cut = max(0, len(ids) - budget)
    for start, end, _ in spans:
        if start < cut < end:
            cut = end
    return ids[cut:], cut > 0, [item for start, _, item in spans if start >= cut]


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
    student = _fit_prompt(tok, ex.student_messages, ex.media, budget)
    teacher = _fit_prompt(tok, ex.teacher_messages, ex.media, budget)
    if student is None or teacher is None:
        if stats is None:
            row = tokens_needed(tok, ex, len(completion_ids), max_length)
            raise DataError(
                f"{ex.source}: the final user turn does not fit in max_length={max_length}: {row.side} and the "
                f"{len(completion_ids)}-token completion need {row.needs} tokens; raise --max_length to at least "
                f"{row.need}, or lower --max_completion_length",
                "prompt_too_long",
            )
        stats["skipped_prompt_too_long"] += 1
        return None
    counts["student_prompt_truncated"] += student[1]
    counts["teacher_prompt_truncated"] += teacher[1]
    return EncodedExample(student[0], teacher[0], completion_ids, student[2], teacher[2])


class TooLong(NamedTuple):
    """A row whose final user turn cannot fit: which prompt (in words, with its length) and the
    max_length the row needs. `exact` is False when `need` is a lower bound: a turn over
    max_length by ChatTokenizer.min_tokens alone (hundreds of KB of text) is not encoded."""

    source: str
    side: str
    need: int
    exact: bool = True

    @property
    def needs(self) -> str:
        return f"{self.need}" if self.exact else f"at least {self.need}"


def tokens_needed(tok: ChatTokenizer, ex: Example, completion_tokens: int, max_length: int) -> TooLong:
    """The TooLong of a row whose final user turn does not fit: the longer of the student's and
    the teacher's final turns, plus the completion. The teacher's is the student's plus its
    context, so only the longer one is counted."""
    def final_turn(messages) -> tuple[int, bool, str]:
        bound = tok.min_tokens(_text_of(messages[-1]))
        if bound + completion_tokens > max_length:
            return bound, False, f"at least {bound} tokens"
        n = len(_encode_turns(tok, messages[-1:], ex.media, add_generation_prompt=True)[0])
        return n, True, f"{n} tokens"

    if ex.teacher_messages[-1] == ex.student_messages[-1]:
        n, exact, said = final_turn(ex.student_messages)
        return TooLong(ex.source, f"the final user turn ({said})", n + completion_tokens, exact)
    n, exact, said = final_turn(ex.teacher_messages)
    reference = REFERENCE_WRAPPER.format(reference=ex.completion) in ex.teacher_messages[-1]["content"]
    extra = ("with the reference answer that --teacher_sees_reference shows it" if reference
             else "with its privileged context")
    return TooLong(ex.source, f"the teacher's final user turn ({extra}: {said})", n + completion_tokens, exact)


def encode_examples(
    tok: ChatTokenizer, examples: list[Example], max_length: int, max_completion_length: int,
    skipped: list | None = None,
) -> tuple[list[EncodedExample], Counter]:
    """encode_example over a list: (encoded rows, truncation and skip counts). `skipped`, if
    given, receives a TooLong for every row that did not fit."""
    stats = Counter()
    encoded = [encode_example(tok, ex, max_length, max_completion_length, stats) for ex in examples]
    kept = [e for e in encoded if e is not None]
    too_long = []
    if len(kept) < len(examples) and (skipped is not None or not kept):
        for ex, enc in zip(examples, encoded):
            if enc is None:
                completion = min(len(tok.encode(ex.completion)) + 1, max_completion_length)
                too_long.append(tokens_needed(tok, ex, completion, max_length))
        if skipped is not None:
            skipped.extend(too_long)
    if examples and not kept:
        lo, hi = min(too_long, key=lambda t: t.need), max(too_long, key=lambda t: t.need)
        span = lo.needs if lo.need == hi.need else f"{lo.needs} to {hi.needs}"
        every = f"{hi.need} keeps every row" if hi.exact else f"one row needs {hi.needs}"
        raise DataError(
            f"no example fits max_length={max_length}: all {len(examples)} were skipped because the final user "
            f"turn and the completion need {span} tokens (the shortest: {lo.side}); raise --max_length to at least "
            f"{lo.need} ({every}), or lower --max_completion_length",
            "empty_dataset",
        )
    return kept, stats


# ---------------------------------------------------------------------------------------------
# 4. Batches
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    student_prompt_ids: torch.Tensor  # [B, Ps] LEFT-padded with pad_id
    student_prompt_mask: torch.Tensor  # [B, Ps] 1 on real tokens
    teacher_prompt_ids: torch.Tensor  # [B, Pt] LEFT-padded
    teacher_prompt_mask: torch.Tensor  # [B, Pt]
    completion_ids: torch.Tensor  # [B, C] RIGHT-padded
    completion_mask: torch.Tensor  # [B, C] 1 on real completion tokens
    student_media: MediaInputs | None = None  # the prompts' media; None when no row has any
    teacher_media: MediaInputs | None = None


def media_inputs(rows: list[list[Media]]) -> MediaInputs | None:
    """The media of a batch's prompts (one list per row, in prompt order) -> MediaInputs, or
    None when no row has media (text-only batches keep the text path).

    Each modality's items are concatenated row after row, in prompt order: the order of their
    placeholder runs in the padded ids. The sound of an audio-in-video video is an audio item
    at the video's place. use_audio_in_video: the batch's videos carry their sound.
    """
    items = [item for row in rows for item in row]
    if not items:
        return None
    images = [item for item in items if item.kind == "image"]
    videos = [item for item in items if item.kind == "video"]
    sounds = [item.features for item in items if item.features is not None]  # clips and video tracks

    def grids(some):  # [n, 3] int64, as the processor gives them
        return torch.tensor([item.grid_thw for item in some], dtype=torch.long)

    return MediaInputs(
        pixel_values=torch.cat([item.pixels for item in images]) if images else None,  # [sum gh*gw, 1536]
        image_grid_thw=grids(images) if images else None,
        pixel_values_videos=torch.cat([item.pixels for item in videos]) if videos else None,
        video_grid_thw=grids(videos) if videos else None,
        video_second_per_grid=torch.tensor([item.second_per_grid for item in videos]) if videos else None,
        input_features=torch.cat(sounds, dim=1) if sounds else None,  # [128, sum frames]
        audio_feature_lens=torch.tensor([f.shape[1] for f in sounds], dtype=torch.long) if sounds else None,
        use_audio_in_video=any(item.features is not None for item in videos),
    )


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
    starts every completion at the same column (see join_prompt_completion); the prompts'
    media gathered for the model (media_inputs)."""
    if not encoded:
        raise ValueError("collate needs at least one example")
    student = _pad([e.student_prompt_ids for e in encoded], pad_id, left=True)
    teacher = _pad([e.teacher_prompt_ids for e in encoded], pad_id, left=True)
    completion = _pad([e.completion_ids for e in encoded], pad_id, left=False)
    student_media = media_inputs([e.student_media for e in encoded])
    # the same object when both prompts carry the same media, so the trainer can see at a glance
    # that one pass of the (frozen) towers serves teacher and student
    same = all(e.teacher_media == e.student_media for e in encoded)
    teacher_media = student_media if same else media_inputs([e.teacher_media for e in encoded])
    return Batch(*student, *teacher, *completion, student_media, teacher_media)


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
