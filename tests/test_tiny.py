"""tiny.py, the embedded default: a complete tiny Qwen3-Omni (config, language model, both towers,
tokenizer with the real special-token ids) that transformers loads and runs like ours."""
import json
import os

import pytest
import torch

from chat import encode_examples, load_tokenizer, render_chat
from data import SAMPLE_DATASET, load_dataset_specs
from model_qwen3omni import MediaInputs
from weights import load_thinker
from tiny import QWEN_TOKEN_IDS, write_tiny_tokenizer
from towers import audio_token_count

BPE_SIZE = 1012  # write_tiny_tokenizer's default


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                                       output_loading_info=True)
    return model.eval(), info


def test_files_and_tokenizer_layout(tiny_model_dir, tok):
    assert sorted(os.listdir(tiny_model_dir)) == [
        "chat_template.json", "config.json", "merges.txt", "model-00001-of-00001.safetensors",
        "model.safetensors.index.json", "preprocessor_config.json", "tokenizer_config.json", "vocab.json"]
    config = json.load(open(os.path.join(tiny_model_dir, "tokenizer_config.json"), encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["bos_token"] is None
    assert {spec["content"]: int(i) for i, spec in config["added_tokens_decoder"].items()} == QWEN_TOKEN_IDS
    # the real ids: ChatML, the media placeholders and markers
    assert (tok.pad_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.eos_ids == [151645, 151643] and tok.vocab_size == 152064  # the embedding's rows
    text = "<|vision_start|><|image_pad|><|video_pad|><|vision_end|><|audio_start|><|audio_pad|><|audio_end|>"
    assert tok.encode(text) == [151652, 151655, 151656, 151653, 151669, 151675, 151670]
    vocab = json.load(open(os.path.join(tiny_model_dir, "vocab.json"), encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(152064))  # BPE, fillers and the special tokens
    merges = open(os.path.join(tiny_model_dir, "merges.txt"), encoding="utf-8").read().splitlines()
    assert len(merges) == 1 + BPE_SIZE - 256  # a header line, then the merges: fillers have none


def test_every_id_the_model_can_emit_reads_as_words(tiny_model_dir, tok):
    """The rows between the BPE and the special tokens decode to whole words (filler_tokens), here
    and in transformers, and text still encodes into the BPE alone."""
    from transformers import AutoTokenizer

    rows = [BPE_SIZE, 5000, 100000, 151642, 151700, 152063]
    text = tok.readable(rows)
    assert text == AutoTokenizer.from_pretrained(tiny_model_dir).decode(rows) and "<" not in text
    assert all(word.isalpha() for word in text.split()) and len(text.split()) >= 2 * len(rows)
    assert all(i < BPE_SIZE for i in tok.encode(text)) and tok.decode(tok.encode(text)) == text


def test_sample_data_tokenises_into_the_small_bpe(tok):
    rows, _, _ = load_dataset_specs([str(SAMPLE_DATASET)], seed=0, split_ratio=0.0, teacher_sees_reference=True)
    encoded, _ = encode_examples(tok, rows, max_length=4096, max_completion_length=4096)
    assert len(encoded) == len(rows) > 100
    for row, e in zip(rows[:20], encoded):
        assert all(i < BPE_SIZE or i in QWEN_TOKEN_IDS.values() for i in e.student_prompt_ids + e.completion_ids)
        assert tok.decode(e.student_prompt_ids) == render_chat(row.student_messages, add_generation_prompt=True)


def test_write_tiny_tokenizer_is_deterministic(tiny_model_dir, tmp_path):
    write_tiny_tokenizer(tmp_path)
    for name in os.listdir(tmp_path):
        assert (tmp_path / name).read_bytes() == open(os.path.join(tiny_model_dir, name), "rb").read(), name


def test_config_has_every_released_field(tiny_model_dir):
    config = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    thinker = config["thinker_config"]
    # the released thinker_config's keys (REFERENCE-omni 1.3 and the released config.json)
    assert {"audio_config", "vision_config", "text_config", "audio_token_id", "image_token_id", "video_token_id",
            "audio_start_token_id", "audio_end_token_id", "vision_start_token_id", "vision_end_token_id",
            "position_id_per_seconds", "seconds_per_chunk", "user_token_id", "initializer_range",
            "tie_word_embeddings", "dtype", "model_type"} <= set(thinker)
    assert (thinker["image_token_id"], thinker["video_token_id"], thinker["audio_token_id"]) == (151655, 151656, 151675)
    assert (thinker["vision_start_token_id"], thinker["audio_start_token_id"], thinker["position_id_per_seconds"]) \
        == (151652, 151669, 13)
    assert thinker["text_config"]["vocab_size"] == 152064
    assert thinker["audio_config"]["output_dim"] == thinker["vision_config"]["out_hidden_size"] == \
        thinker["text_config"]["hidden_size"]
    assert {"im_start_token_id", "im_end_token_id", "system_token_id", "user_token_id", "assistant_token_id",
            "enable_audio_output"} <= set(config)


def test_transformers_loads_it_completely(hf_model):
    model, info = hf_model
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert type(model.thinker.model.audio_tower).__name__ == "Qwen3OmniMoeAudioEncoder"


def media_prompt(tok, g):
    """Two left-padded chat prompts rendered with the tokenizer: one with an image, an audio clip and a
    video (placeholders expanded as the processor does), one text-only; and their MediaInputs."""
    image, video, frames = (1, 4, 6), (2, 4, 4), 250
    blocks = ("<|vision_start|>" + "<|image_pad|>" * (image[0] * image[1] * image[2] // 4) + "<|vision_end|>"
              + "<|audio_start|>" + "<|audio_pad|>" * audio_token_count(frames) + "<|audio_end|>"
              + "<|vision_start|>" + "<|video_pad|>" * (video[0] * video[1] * video[2] // 4) + "<|vision_end|>")
    rows = [tok.encode(render_chat([{"role": "user", "content": blocks + "Describe all three."}], True)),
            tok.encode(render_chat([{"role": "user", "content": "Give three tips for staying healthy."}], True))]
    T = max(map(len, rows))
    ids = torch.tensor([[tok.pad_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    patch = 3 * 2 * 16 * 16
    media = MediaInputs(pixel_values=torch.randn(24, patch, generator=g), image_grid_thw=torch.tensor([image]),
                        pixel_values_videos=torch.randn(32, patch, generator=g), video_grid_thw=torch.tensor([video]),
                        video_second_per_grid=torch.tensor([1.0]), input_features=torch.randn(128, frames, generator=g),
                        audio_feature_lens=torch.tensor([frames]))
    return ids, mask, media


def test_media_prompt_logits_equal_transformers(tiny_model_dir, tok, hf_model):
    model, _ = hf_model
    ids, mask, media = media_prompt(tok, torch.Generator().manual_seed(0))
    ours = load_thinker(tiny_model_dir, dtype=torch.float32, towers=True)
    with torch.no_grad():
        ref = model.thinker(input_ids=ids, attention_mask=mask, pixel_values=media.pixel_values,
                            image_grid_thw=media.image_grid_thw, pixel_values_videos=media.pixel_values_videos,
                            video_grid_thw=media.video_grid_thw, video_second_per_grid=media.video_second_per_grid,
                            input_features=media.input_features[None],
                            feature_attention_mask=torch.ones(1, media.input_features.shape[1], dtype=torch.long)
                            ).logits
        out = ours(ids, mask, media_inputs=media)
        text_only = load_thinker(tiny_model_dir, dtype=torch.float32)(ids[1:], mask[1:])
    diff = (out - ref)[mask.bool()].abs().max().item()
    print(f"embedded default, media prompt: fp32 logits max diff vs transformers {diff:.2e}")
    assert diff <= 1e-5
    assert (text_only - ref[1:])[mask[1:].bool()].abs().max() <= 1e-5  # a text-only load, no towers
