"""The embedded default: a tiny random Qwen3-Omni in the released layout.

`bash run.sh` without MODEL trains it, and the tests use it (tests/conftest.py `tiny_model_dir`). It is
the released model at toy width and complete, so everything that reads a real checkpoint reads it too
(transformers' Qwen3OmniMoeForConditionalGeneration.from_pretrained included):

* config.json with every field of the released one: the thinker's text_config, audio_config and
  vision_config, the media ids and timing (released values), no talker (enable_audio_output false);
* the thinker's language model and both towers, random, in the released key layout
  (thinker.model.*, thinker.audio_tower.*, thinker.visual.*);
* a Qwen2 tokenizer (vocab.json, merges.txt, tokenizer_config.json) with a small byte-level BPE trained
  on the bundled sample data, whose special tokens carry their REAL Qwen3-Omni ids (<|im_end|> 151645,
  <|image_pad|> 151655, <|audio_pad|> 151675, ...): the embedding has the released 152064 rows, and the
  rows the BPE leaves without text get words run together (`filler_tokens`), so completions read as words;
* chat_template.json and preprocessor_config.json (the released preprocessing values).

Read top to bottom: the tokenizer -> the model config -> random weights -> ensure_default_model.
Random checkpoints of other sizes for the tests come from `write_random_checkpoint`.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from chat import QWEN_ADDED_TOKENS, _qwen_pipeline
from data import REFERENCE_WRAPPER, SAMPLE_DATASET, load_dataset_specs
from model_qwen3omni import Thinker, ThinkerConfig
from weights import save_released
from towers import AudioConfig, VisionConfig

# Bumped whenever what this file writes changes, so that a cached default from an older version is
# never picked up (ensure_default_model only checks that a checkpoint is there).
TINY_VERSION = 3
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache",
                                 f"tiny-qwen3-omni-v{TINY_VERSION}")


# ----------------------------------------------------------------------------------------------
# Tokenizer

# The added tokens' ids in the released tokenizer_config.json (chat.QWEN_ADDED_TOKENS lists the ones
# selfkd uses, in this order).
QWEN_TOKEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                  "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                  "<|video_pad|>": 151656, "<think>": 151667, "</think>": 151668, "<|audio_start|>": 151669,
                  "<|audio_end|>": 151670, "<|audio_pad|>": 151675}

# What transformers' Qwen3OmniMoeProcessor reads off the tokenizer (`tokenizer.image_token`, ...).
MEDIA_SPECIAL_TOKENS = {"image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>",
                        "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
                        "vision_eos_token": "<|vision_end|>", "audio_bos_token": "<|audio_start|>",
                        "audio_eos_token": "<|audio_end|>"}

# The Jinja template written into tokenizer_config.json / chat_template.json, in the style of
# Qwen3-Omni's: ChatML turns, no default system prompt, media parts become placeholder tokens.
# For text messages it renders exactly what chat.render_chat returns (tests/test_data.py checks
# this through transformers).
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

# Text the tiny tokenizer should see besides the sample rows: the ChatML role names, so
# that they become single tokens as in the real vocabulary, and a common English system prompt.
_EXTRA_TEXT = "system\nuser\nassistant\nYou are a helpful assistant.\n"


def write_tiny_tokenizer(out_dir, bpe_vocab_size: int = 1012, real_ids: bool = True) -> None:
    """Train a small Qwen-style byte-level BPE (256 bytes + merges, at most `bpe_vocab_size` ids) on
    the bundled sample dataset and write it in the released checkpoint's layout: vocab.json,
    merges.txt, tokenizer_config.json, chat_template.json.

    The added tokens get their real ids (QWEN_TOKEN_IDS), far above the BPE ids. They are listed
    in vocab.json at those ids as well as in tokenizer_config.json's added_tokens_decoder: an added
    token that the vocabulary already holds keeps the vocabulary's id, in `tokenizers` (data.py's
    load_tokenizer) and in transformers alike, where a new one would take the next free id. The ids
    left between them get filler_tokens: the vocabulary covers all 152064 rows of the embedding.
    real_ids=False puts them right after the BPE ids instead (a 1024-id vocabulary): a text-only
    model that small runs the loss and sampling 6x faster on CPU, which the trainer's own tests use.
    """
    if bpe_vocab_size < 257:
        raise ValueError(f"bpe_vocab_size must be at least 257 (256 bytes + 1 merge), got {bpe_vocab_size}")
    if [c for c, _ in QWEN_ADDED_TOKENS] != list(QWEN_TOKEN_IDS):
        raise AssertionError("chat.QWEN_ADDED_TOKENS and QWEN_TOKEN_IDS list different tokens")
    train, _, _ = load_dataset_specs([str(SAMPLE_DATASET)], seed=0, split_ratio=0.0)
    texts = [_EXTRA_TEXT, REFERENCE_WRAPPER]
    for example in train:
        texts += [message["content"] for message in example.teacher_messages] + [example.completion]

    tokenizer = _qwen_pipeline(Tokenizer(BPE()))
    trainer = BpeTrainer(
        vocab_size=bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.model.save(out_dir)  # vocab.json and merges.txt
    vocab_file = os.path.join(out_dir, "vocab.json")
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    first = len(vocab)
    ids = QWEN_TOKEN_IDS if real_ids else {content: first + i for i, (content, _) in enumerate(QWEN_ADDED_TOKENS)}
    vocab.update(ids)
    if real_ids:  # every row of the released embedding gets text, so whatever the model emits reads as words
        unused = sorted(set(range(ThinkerConfig.vocab_size)) - set(vocab.values()))
        vocab.update(zip(filler_tokens(vocab, len(unused), texts), unused))
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    added_tokens_decoder = {
        str(ids[content]): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in QWEN_ADDED_TOKENS
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
        "extra_special_tokens": MEDIA_SPECIAL_TOKENS,
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


def filler_tokens(vocab: dict[str, int], count: int, texts: list[str]) -> list[str]:
    """`count` new tokens, each two or three of the vocabulary's words run together (" capital of",
    " hours the larger", ...), in a fixed order; a word is a token " word" whose word `texts` use whole.

    They give text to the embedding rows a small BPE leaves without any (the released model has
    152,064; the BPE ~1,000), so that a random tiny model's completions print as words, not ids.
    No merge produces them, so encoding is unchanged: they are only ever decoded."""
    used = set(re.findall("[A-Za-z]+", " ".join(texts)))
    words = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])
             if re.fullmatch("Ġ[A-Za-z]+", t) and t[1:] in used]  # Ġ: the byte-level space
    fillers = []
    for n in (2, 3):
        for parts in itertools.product(words, repeat=n):
            token = "".join(parts)
            if token not in vocab:
                fillers.append(token)
                if len(fillers) == count:
                    return fillers
    raise ValueError(f"{len(words)} whole words make fewer than {count} filler tokens")


# ----------------------------------------------------------------------------------------------
# Model config

# The released preprocessor_config.json (what media.py implements; transformers' processor reads it)
PREPROCESSOR_CONFIG = {
    "feature_extractor_type": "WhisperFeatureExtractor", "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen3OmniMoeProcessor", "sampling_rate": 16000, "feature_size": 128, "n_fft": 400,
    "hop_length": 160, "n_samples": 4800000, "nb_max_frames": 30000, "dither": 0.0, "padding_value": 0.0,
    "padding_side": "right", "return_attention_mask": True, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
    "min_pixels": 3136, "max_pixels": 12845056,
}


def tiny_thinker_config() -> ThinkerConfig:
    """The released architecture at toy width: GQA, 8 experts top-2, interleaved MRoPE, the real vocabulary
    size and media ids (ThinkerConfig's defaults), and two tiny towers writing at the LM width. The towers
    keep the released structural constants (128 mel bins, 1 s chunks, 8 s attention windows, 16-px patches,
    2x2 merge, 2-frame slices) at shared/omni_tiny_hf.py's widths."""
    hidden = 128
    audio = AudioConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
                        downsample_hidden_size=8, output_dim=hidden)
    vision = VisionConfig(depth=4, hidden_size=32, num_heads=4, intermediate_size=48, num_position_embeddings=64,
                          out_hidden_size=hidden, deepstack_visual_indexes=[1, 3])
    return ThinkerConfig(hidden_size=hidden, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                         intermediate_size=256, rope_theta=10000.0, max_position_embeddings=4096,
                         audio_config=audio, vision_config=vision)


# ----------------------------------------------------------------------------------------------
# Random weights


def init_random_(model: Thinker, seed: int = 0, std: float = 0.02):
    """Seeded random weights. Language model: matrices N(0, std^2), norm weights 1 + N(0, 0.01).
    Towers: matrices at unit scale, N(0, 1/fan_in), so their activations neither vanish nor grow
    through the layers; LayerNorm weights 1 + N(0, 0.01), biases N(0, 0.01) (not 0 and 1, so that a
    transposed or misplaced tensor shows in a comparison)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        tower = name.startswith(("audio_tower.", "visual."))
        with torch.no_grad():
            if tower and name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif p.dim() == 1:  # norm weights
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise * (p[0].numel() ** -0.5 if tower else std))


def write_random_checkpoint(cfg: ThinkerConfig, path: str, seed: int = 0, dtype=torch.float32,
                            max_shard_bytes: int = 2 * 2**30, std: float = 0.02) -> str:
    """A randomly initialised thinker (with the towers `cfg` carries) in the released layout
    (`thinker.` prefix, per-expert keys) and its config.json."""
    model = Thinker(cfg)
    init_random_(model, seed, std)
    save_released(cfg, model.state_dict().items(), path, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return path


def ensure_default_model(path: str = DEFAULT_MODEL_DIR) -> str:
    """Write the tiny random Qwen3-Omni checkpoint (released layout + tokenizer files) once.
    Written to a temporary directory and renamed, so a concurrent or interrupted run never
    sees half of it."""
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return path
    tmp = f"{path}.tmp-{os.getpid()}"
    write_tiny_tokenizer(tmp)
    # std 0.15 rather than 0.02: peaked enough that the teacher's extra context visibly changes
    # its next-token distribution, so the demo has something to distil
    write_random_checkpoint(tiny_thinker_config(), tmp, seed=0, std=0.15)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR_CONFIG, f, indent=2)
    try:
        os.replace(tmp, path)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return path
