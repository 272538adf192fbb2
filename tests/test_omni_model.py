"""The thinker's multimodal forward against transformers 5.24's Qwen3-Omni thinker.

First the language-model side (placeholder scatter, deepstack, MRoPE positions, decoding from media
prompts) with the tower outputs taken from transformers' own towers, so that ours gets exactly the
embeddings HF scatters. Then the whole thinker with OUR towers (towers.py) loaded from the released
layout: MediaInputs in, logits and greedy generations out; the towers' LoRA; and the same under
ZeRO-3 with 2 processes. Inputs are built by hand (no processor): placeholder runs of the right
lengths, random pixel rows and log-mel features.
"""
import os
import subprocess
import sys

import pytest
import torch

from hf_models import unit_scale_
from lora import inject_lora, lora_disabled, lora_parameters, save_adapter
from test_lora import randomize_B_
from generate import generate
from model_qwen3omni import MediaEmbeds, MediaInputs, Thinker, ThinkerConfig, mrope_cos_sin, rope_cos_sin, rope_index
from weights import load_thinker
from tiny import init_random_
from zero3_omni import VOCAB_STRIDE

# Released special ids (the released config.json): the tiny HF model uses them, so its vocab is the real 152064.
VS, VE, AS, AE = 151652, 151653, 151669, 151670
IMG, VID, AUD = 151655, 151656, 151675
IDS = dict(audio_token_id=AUD, image_token_id=IMG, video_token_id=VID, audio_start_token_id=AS,
           audio_end_token_id=AE, vision_start_token_id=VS, vision_end_token_id=VE, position_id_per_seconds=13,
           seconds_per_chunk=2, user_token_id=872)
TEXT = dict(vocab_size=152064, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2],
                             "interleaved": True, "mrope_interleaved": True},
            max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
            tie_word_embeddings=False)
# real structural constants (128 mel bins, 100-frame chunks, 16-px patches, 2x2 merge, 2-frame slices), tiny widths
AUDIO = dict(d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32, encoder_layers=1, num_mel_bins=128,
             downsample_hidden_size=8, output_dim=64, n_window=50, n_window_infer=200, max_source_positions=1500)
VISION = dict(depth=2, hidden_size=16, out_hidden_size=64, intermediate_size=32, num_heads=2, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
              deepstack_visual_indexes=[0, 1])
PATCH = 3 * 2 * 16 * 16  # one pixel row: (C, T, Ph, Pw)


def n_audio_tokens(frames: int) -> int:  # transformers' _get_feat_extract_output_lengths
    c = lambda n: (n - 1) // 2 + 1
    r = frames % 100
    return (frames // 100) * 13 + (c(c(c(r))) if r else 0)


def hf_omni_model(seed: int = 0):
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeThinkerConfig

    thinker = Qwen3OmniMoeThinkerConfig(text_config=dict(TEXT), audio_config=dict(AUDIO), vision_config=dict(VISION),
                                        **IDS)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(thinker_config=thinker.to_dict(),
                                                                    enable_audio_output=False)).float()
    with torch.no_grad():  # the HF init leaves norms at 1 and the router at 0: randomise them too
        for name, p in model.thinker.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    # the towers at unit scale: HF's 0.02 init leaves their GELUs and softmaxes nearly linear / uniform
    unit_scale_(model.thinker.model.audio_tower, seed + 1)
    unit_scale_(model.thinker.model.visual, seed + 2)
    for c in (model.config, model.thinker.config, model.thinker.config.text_config):
        c._attn_implementation = "sdpa"
    return model.eval()


# ---- hand-built prompts --------------------------------------------------------------------------


def interleave_audio_in_video(grid, spg: float, n_audio: int) -> list[int]:
    """The processor's audio-in-video order (REFERENCE-omni 4.4): a video token is emitted while its
    time t*spg*13 is <= the next audio token's index, else the audio token; then the leftovers."""
    t, h, w = grid
    per_slice = h * w // 4
    video_keys = [s * spg * 13 for s in range(t) for _ in range(per_slice)]
    out, v, a = [], 0, 0
    while v < len(video_keys) and a < n_audio:
        if video_keys[v] <= a:
            out.append(VID)
            v += 1
        else:
            out.append(AUD)
            a += 1
    return out + [VID] * (len(video_keys) - v) + [AUD] * (n_audio - a)


def build_row(segments, g):
    """segments: ("text", n) | ("image", grid) | ("video", grid) | ("audio", n_tokens) |
    ("aiv", grid, spg, n_audio) -> token ids."""
    ids = []
    for seg in segments:
        kind = seg[0]
        if kind == "text":
            ids += torch.randint(1000, 150000, (seg[1],), generator=g).tolist()
        elif kind in ("image", "video"):
            t, h, w = seg[1]
            ids += [VS] + [IMG if kind == "image" else VID] * (t * h * w // 4) + [VE]
        elif kind == "audio":
            ids += [AS] + [AUD] * seg[1] + [AE]
        else:
            ids += [VS, AS] + interleave_audio_in_video(seg[1], seg[2], seg[3]) + [AE, VE]
    return ids


def left_pad(rows):
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask


def media_batch(row_segments, seed=0):
    """Left-padded ids/mask and the HF-style media tensors for rows of segments (media in prompt order)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([build_row(segs, g) for segs in row_segments])
    images = [s[1] for segs in row_segments for s in segs if s[0] == "image"]
    videos = [s for segs in row_segments for s in segs if s[0] in ("video", "aiv")]
    frames = [s[2] if s[0] == "audio" else s[4] for segs in row_segments for s in segs if s[0] in ("audio", "aiv")]
    batch = dict(input_ids=ids, attention_mask=mask)
    if images:
        batch["image_grid_thw"] = torch.tensor(images)
        batch["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in images), PATCH, generator=g)
    if videos:
        grids = [s[1] for s in videos]
        batch["video_grid_thw"] = torch.tensor(grids)
        batch["video_second_per_grid"] = torch.tensor([s[2] for s in videos], dtype=torch.float32)
        batch["pixel_values_videos"] = torch.randn(sum(t * h * w for t, h, w in grids), PATCH, generator=g)
    if frames:
        batch["input_features"] = torch.randn(len(frames), 128, max(frames), generator=g)
        fmask = torch.zeros(len(frames), max(frames), dtype=torch.int32)
        for i, f in enumerate(frames):
            fmask[i, :f] = 1
        batch["feature_attention_mask"] = fmask
    return batch


def audio(frames):  # an audio segment: ("audio", tokens, frames)
    return ("audio", n_audio_tokens(frames), frames)


def aiv(grid, spg, frames):
    return ("aiv", grid, spg, n_audio_tokens(frames), frames)


# Left-padded mix: text only, one image, two images, audio only, video (+ image + audio in one row).
MIXED = [
    [("text", 9)],
    [("text", 3), ("image", (1, 4, 6)), ("text", 2)],
    [("text", 2), ("image", (1, 4, 4)), ("text", 1), ("image", (1, 4, 6)), ("text", 2)],
    [("text", 2), audio(120), ("text", 2)],
    [("text", 1), ("video", (2, 4, 4), 0.5), ("text", 1), ("image", (1, 4, 4)), audio(250), ("text", 2)],
]


def hf_rope_index(hf, batch, use_audio_in_video=False):
    fmask = batch.get("feature_attention_mask")
    return hf.thinker.model.get_rope_index(
        batch["input_ids"], batch.get("image_grid_thw"), batch.get("video_grid_thw"), batch["attention_mask"],
        use_audio_in_video, None if fmask is None else fmask.sum(-1), batch.get("video_second_per_grid"))


def our_rope_index(cfg, batch, use_audio_in_video=False):
    fmask = batch.get("feature_attention_mask")
    counts = None if fmask is None else [n_audio_tokens(int(f)) for f in fmask.sum(-1)]
    return rope_index(batch["input_ids"], batch["attention_mask"], cfg, image_grid_thw=batch.get("image_grid_thw"),
                      video_grid_thw=batch.get("video_grid_thw"),
                      video_second_per_grid=batch.get("video_second_per_grid"), audio_token_counts=counts,
                      use_audio_in_video=use_audio_in_video)


def hf_media(hf, batch):
    """Our MediaEmbeds from HF's own towers (what HF scatters into the placeholders)."""
    m, media = hf.thinker.model, []
    if "input_features" in batch:
        out = m.get_audio_features(batch["input_features"], batch["feature_attention_mask"])
        media.append(MediaEmbeds("audio", out.last_hidden_state))
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        if pixels in batch:
            f = m.get_video_features if kind == "video" else m.get_image_features
            out = f(batch[pixels], batch[grid])
            media.append(MediaEmbeds(kind, torch.cat(out.pooler_output),
                                     [torch.cat(level) for level in out.deepstack_features]))
    return media


@pytest.fixture(scope="module")
def omni_saved(tmp_path_factory):
    """(HF full model fp32, the directory of its save_pretrained: the released layout)."""
    hf = hf_omni_model(seed=1)
    path = str(tmp_path_factory.mktemp("omni"))
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def omni(omni_saved):
    """(HF full model fp32, our text-only Thinker loaded from its save_pretrained, our config)."""
    hf, path = omni_saved
    ours = load_thinker(path, dtype=torch.float32)
    return hf, ours, ours.cfg


@pytest.fixture(scope="module")
def with_towers(omni_saved):
    """(HF full model fp32, our Thinker with its towers, loaded from the same directory)."""
    hf, path = omni_saved
    return hf, load_thinker(path, dtype=torch.float32, towers=True)


def media_inputs(batch, use_audio_in_video=False) -> MediaInputs:
    """The data layer's MediaInputs for an HF-style batch: the clips' valid frames concatenated in time."""
    fmask = batch.get("feature_attention_mask")
    lens = None if fmask is None else fmask.sum(-1)
    features = None if fmask is None else \
        torch.cat([f[:, :n] for f, n in zip(batch["input_features"], lens.tolist())], dim=1)
    return MediaInputs(pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                       pixel_values_videos=batch.get("pixel_values_videos"),
                       video_grid_thw=batch.get("video_grid_thw"),
                       video_second_per_grid=batch.get("video_second_per_grid"), input_features=features,
                       audio_feature_lens=lens, use_audio_in_video=use_audio_in_video)


def masked_max_diff(a, b, mask):
    return (a.float() - b.float())[mask.bool()].abs().max().item()


# ---- config ---------------------------------------------------------------------------------------


def test_config_released_defaults_and_thinker_level_ids(omni):
    real = ThinkerConfig()
    assert real.mrope_section == [24, 20, 20]
    assert (real.audio_token_id, real.image_token_id, real.video_token_id) == (151675, 151655, 151656)
    assert (real.audio_start_token_id, real.audio_end_token_id) == (151669, 151670)
    assert (real.vision_start_token_id, real.vision_end_token_id) == (151652, 151653)
    assert real.position_id_per_seconds == 13 and real.spatial_merge_size == 2
    _, _, cfg = omni  # read from the HF save: ids at the thinker_config level, section from rope_parameters
    assert cfg.mrope_section == [4, 2, 2] and cfg.image_token_id == IMG and cfg.position_id_per_seconds == 13
    text = ThinkerConfig(head_dim=16, hidden_size=64, num_attention_heads=4).to_hf_text_config()
    other = {"model_type": "qwen3_omni_moe_thinker", "text_config": text, "audio_token_id": 151646,
             "audio_start_token_id": 151647, "position_id_per_seconds": 25, "vision_config": {"spatial_merge_size": 4}}
    got = ThinkerConfig.from_dict(other)
    assert (got.audio_token_id, got.audio_start_token_id, got.position_id_per_seconds) == (151646, 151647, 25)
    assert got.spatial_merge_size == 4 and got.image_token_id == IMG  # absent keys keep the released values
    with pytest.raises(ValueError, match="mrope_section"):
        ThinkerConfig(head_dim=16, mrope_section=[24, 20, 20])


# ---- positions ------------------------------------------------------------------------------------


def test_rope_index_worked_example():
    """REFERENCE-omni 4.3, literally: 3 text, image 1x4x6, text, 7-token audio, video 2x4x4 at 1 s/grid, text."""
    cfg = ThinkerConfig()
    ids = torch.tensor([[1, 2, 3, VS] + [IMG] * 6 + [VE, 4, AS] + [AUD] * 7 + [AE, VS] + [VID] * 8 + [VE, 5]])
    pos, delta = rope_index(ids, torch.ones_like(ids), cfg, image_grid_thw=[[1, 4, 6]], video_grid_thw=[[2, 4, 4]],
                            video_second_per_grid=[1.0], audio_token_counts=[7])
    txt = lambda *p: [(v, v, v) for v in p]
    want = (txt(0, 1, 2, 3) + [(4, 4, 4), (4, 4, 5), (4, 4, 6), (4, 5, 4), (4, 5, 5), (4, 5, 6)] + txt(7, 8, 9)
            + txt(*range(10, 17)) + txt(17, 18) + [(19, 19, 19), (19, 19, 20), (19, 20, 19), (19, 20, 20)]
            + [(32, 19, 19), (32, 19, 20), (32, 20, 19), (32, 20, 20)] + txt(33, 34))
    assert pos.dtype == torch.float32 and pos.shape == (3, 1, 32)
    assert pos[:, 0].T.tolist() == [list(map(float, p)) for p in want]
    assert delta.tolist() == [[3.0]]


def test_rope_index_equals_hf_left_padded(omni):
    hf, _, cfg = omni
    rows = MIXED + [[("text", 2), ("video", (3, 4, 6), 2 / 3), ("text", 1)]]  # fractional time step 26/3
    batch = media_batch(rows)
    pos, delta = our_rope_index(cfg, batch)
    ref_pos, ref_delta = hf_rope_index(hf, batch)
    assert pos.dtype == ref_pos.dtype == torch.float32
    assert torch.equal(pos, ref_pos) and torch.equal(delta, ref_delta)
    assert pos[0, 5].frac().abs().sum() > 0  # the 2/3 s video really has fractional times


def test_rope_index_audio_in_video_equals_hf(omni):
    hf, _, cfg = omni
    rows = [[("text", 3), aiv((2, 4, 4), 1.0, 200), ("text", 2)],  # V4 A13 V4 A13
            [("text", 2), aiv((1, 4, 28), 1.0, 50), ("text", 3)],  # V28 then A7: the wide video outlasts the audio
            [("text", 6)]]
    batch = media_batch(rows)
    assert batch["input_ids"][0].tolist().count(AUD) == 26
    pos, delta = our_rope_index(cfg, batch, use_audio_in_video=True)
    ref_pos, ref_delta = hf_rope_index(hf, batch, use_audio_in_video=True)
    assert torch.equal(pos, ref_pos) and torch.equal(delta, ref_delta)
    with pytest.raises(ValueError, match="use_audio_in_video"):
        our_rope_index(cfg, batch, use_audio_in_video=False)


def test_rope_index_text_and_audio_only_is_hfs_1d_branch(omni):
    hf, _, cfg = omni
    batch = media_batch([[("text", 7)], [("text", 2), audio(130), ("text", 1)], [("text", 1)]])
    pos, delta = our_rope_index(cfg, batch)
    ref_pos, ref_delta = hf_rope_index(hf, batch)
    assert torch.equal(pos, ref_pos) and torch.equal(delta, ref_delta)


def test_rope_index_rejects_runs_that_do_not_fit_their_grid(omni):
    _, _, cfg = omni
    batch = media_batch([[("text", 2), ("image", (1, 4, 6)), ("text", 1)]])
    with pytest.raises(ValueError, match=r"image 0: grid 1x4x4 needs 4 placeholder tokens, the prompt holds 6"):
        rope_index(batch["input_ids"], batch["attention_mask"], cfg, image_grid_thw=[[1, 4, 4]])
    with pytest.raises(ValueError, match=r"image: 2 image_grid_thw rows but 1 image blocks"):
        rope_index(batch["input_ids"], batch["attention_mask"], cfg, image_grid_thw=[[1, 4, 6], [1, 4, 4]])


def test_mrope_cos_sin_bit_identical_to_hf_and_to_1d_rope_on_text(omni):
    hf, _, cfg = omni
    rotary = hf.thinker.model.language_model.rotary_emb
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 3000, (3, 2, 9), generator=g).float() + torch.tensor([0.0, 0.5, 1 / 3])[:, None, None]
    x = torch.zeros(1, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = mrope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, dtype)
        ref_cos, ref_sin = rotary(x.to(dtype), pos)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    # interleaved layout of [4, 2, 2] over 8 slots: T on 0, 3, 6, 7; H on 1, 4; W on 2, 5 (REFERENCE-omni 4.6)
    for axis, slots in enumerate(([0, 3, 6, 7], [1, 4], [2, 5])):
        probe = torch.zeros(3, 1, 1)
        probe[axis] = 1.0
        _, sin = mrope_cos_sin(probe, 16, 1.0, [4, 2, 2], torch.float32)  # theta 1: every frequency is 1
        assert sin[0, 0, :8].nonzero().flatten().tolist() == slots
    # released [24, 20, 20] over 64 slots: T on 0, 3, ..., 57 and 60..63; H on 1, 4, ..., 58; W on 2, 5, ..., 59
    for axis in range(3):
        probe = torch.zeros(3, 1, 1)
        probe[axis] = 1.0
        _, sin = mrope_cos_sin(probe, 128, 1.0, [24, 20, 20], torch.float32)
        want = list(range(axis, 60, 3)) + (list(range(60, 64)) if axis == 0 else [])
        assert sin[0, 0, :64].nonzero().flatten().tolist() == want
    # equal axes: exactly the 1-D RoPE the text path uses
    p1 = torch.randint(0, 5000, (2, 11), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        a = mrope_cos_sin(p1[None].expand(3, -1, -1), cfg.head_dim, cfg.rope_theta, cfg.mrope_section, dtype)
        b = rope_cos_sin(p1, cfg.head_dim, cfg.rope_theta, dtype)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- forward and generate -------------------------------------------------------------------------


def test_fp32_logits_match_hf_multimodal_left_padded(omni):
    hf, ours, cfg = omni
    batch = media_batch(MIXED)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = hf.thinker(**batch).logits
        media = hf_media(hf, batch)
        pos, _ = our_rope_index(cfg, batch)
        out = ours(ids, mask, media=media, position_ids=pos)
        diff = masked_max_diff(out, ref, mask)
        # the check is sensitive to both multimodal parts: without deepstack, or with 1-D positions, it fails
        flat = [MediaEmbeds(m.modality, m.embeds) for m in media]
        no_deepstack = masked_max_diff(ours(ids, mask, media=flat, position_ids=pos), ref, mask)
        one_d = (mask.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
        no_mrope = masked_max_diff(ours(ids, mask, media=media, position_ids=one_d), ref, mask)
    print(f"multimodal fp32 logits max diff vs HF: {diff:.2e} (no deepstack {no_deepstack:.2e}, "
          f"1-D positions {no_mrope:.2e})")
    assert out.shape == ref.shape == (5, ids.shape[1], 152064)
    assert diff <= 1e-5
    assert no_deepstack > 1e-3 and no_mrope > 1e-3


def test_fp32_logits_match_hf_audio_in_video(omni):
    hf, ours, cfg = omni
    batch = media_batch([[("text", 3), aiv((2, 4, 4), 1.0, 200), ("text", 2)], [("text", 5)]])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = hf.thinker(**batch, use_audio_in_video=True).logits
        pos, _ = our_rope_index(cfg, batch, use_audio_in_video=True)
        out = ours(ids, mask, media=hf_media(hf, batch), position_ids=pos)
    diff = masked_max_diff(out, ref, mask)
    print(f"audio-in-video fp32 logits max diff vs HF: {diff:.2e}")
    assert diff <= 1e-5


def test_greedy_generate_from_media_prompts_matches_hf(omni):
    hf, ours, cfg = omni
    rows = [MIXED[1], MIXED[3], MIXED[4], MIXED[0]]
    batch = media_batch(rows, seed=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = hf.thinker.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
        pos, delta = our_rope_index(cfg, batch)
        tokens, alive = generate(ours, ids, mask, 4, eos_ids=[cfg.vocab_size + 1], pad_id=0,
                                 media=hf_media(hf, batch), position_ids=pos)
    assert torch.equal(tokens, ref[:, ids.shape[1]:]) and alive.all()
    # the decode positions (last prompt position + 1) are cumsum(mask) - 1 + rope_delta for these prompts
    assert torch.equal(pos[:, :, -1] + 1, (mask.sum(-1) + delta[:, 0]).float()[None].expand(3, -1))


def test_greedy_generate_audio_in_video_matches_hf(omni):
    """Row 0 is the audio-in-video case whose end markers restart below the video's largest position:
    decoding continues from the last prompt position (transformers' generate), not at
    cumsum(mask) - 1 + rope_delta."""
    hf, ours, cfg = omni
    batch = media_batch([[("text", 2), aiv((1, 4, 28), 1.0, 50), ("text", 3)],
                         [("text", 3), aiv((2, 4, 4), 1.0, 200), ("text", 2)]], seed=4)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = hf.thinker.generate(**batch, use_audio_in_video=True, max_new_tokens=4, min_new_tokens=4,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
        pos, delta = our_rope_index(cfg, batch, use_audio_in_video=True)
        tokens, _ = generate(ours, ids, mask, 4, eos_ids=[cfg.vocab_size + 1], pad_id=0,
                             media=hf_media(hf, batch), position_ids=pos)
    assert torch.equal(tokens, ref[:, ids.shape[1]:])
    assert pos[0, 0, -1] + 1 < mask[0].sum() + delta[0, 0]  # the two rules differ on row 0


def test_placeholder_count_mismatch_names_modality_and_counts(omni):
    hf, ours, cfg = omni
    batch = media_batch([[("text", 2), ("image", (1, 4, 6)), ("text", 1)]])
    pos, _ = our_rope_index(cfg, batch)
    with pytest.raises(ValueError, match=r"image: 6 placeholder tokens .* \(4, 64\)"):
        ours(batch["input_ids"], batch["attention_mask"], media=[MediaEmbeds("image", torch.zeros(4, 64))],
             position_ids=pos)
    with pytest.raises(ValueError, match=r"audio: 0 placeholder tokens .* \(3, 64\)"):
        ours(batch["input_ids"], batch["attention_mask"], media=[MediaEmbeds("audio", torch.zeros(3, 64))])
    with pytest.raises(ValueError, match="position_ids"):
        ours(batch["input_ids"], batch["attention_mask"], media=[MediaEmbeds("image", torch.zeros(6, 64))])


def test_gradient_checkpointing_with_media_gives_same_gradients():
    """Deepstack and scattered embeddings under activation checkpointing: same gradients, and the
    gradient reaches the tower outputs (embeds and every deepstack level)."""
    cfg = ThinkerConfig(vocab_size=600, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16, image_token_id=590, video_token_id=591, audio_token_id=592,
                        vision_start_token_id=593, vision_end_token_id=594, audio_start_token_id=595,
                        audio_end_token_id=596)
    model = Thinker(cfg)
    init_random_(model, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[0, 5, 7, 593, 591, 591, 594, 595, 592, 596, 593, 590, 590, 590, 590, 594, 9],
                        [1, 2, 593, 590, 590, 590, 590, 594, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    pos, _ = rope_index(ids, mask, cfg, image_grid_thw=[[1, 4, 4], [1, 4, 4]], video_grid_thw=[[2, 2, 2]],
                        video_second_per_grid=[1.0])
    leaf = lambda *s: torch.randn(*s, generator=g).requires_grad_()
    media = [MediaEmbeds("image", leaf(8, 32), [leaf(8, 32), leaf(8, 32)]),
             MediaEmbeds("video", leaf(2, 32), [leaf(2, 32), leaf(2, 32)]), MediaEmbeds("audio", leaf(1, 32))]
    grads = []
    for ckpt in (False, True):
        model.train().gradient_checkpointing = ckpt
        model.zero_grad()
        for m in media:
            for t in [m.embeds, *m.deepstack]:
                t.grad = None
        model(ids, mask, media=media, position_ids=pos).square().mean().backward()
        leaves = [t for m in media for t in [m.embeds, *m.deepstack]]
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)
        grads.append([p.grad.clone() for p in model.parameters()] + [t.grad.clone() for t in leaves])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


# ---- the thinker with its towers ------------------------------------------------------------------

# audio in video: 4 video tokens per slice interleaved with 13 audio tokens per second; a wide video
# that outlasts its audio; a text-only row
AIV_ROWS = [[("text", 3), aiv((2, 4, 4), 1.0, 200), ("text", 2)],
            [("text", 2), aiv((1, 4, 28), 1.0, 50), ("text", 3)],
            [("text", 5)]]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_text_only_load_builds_no_towers(omni, with_towers):
    hf, text_only, cfg = omni
    _, full = with_towers
    assert text_only.audio_tower is None and text_only.visual is None
    assert cfg.audio_config is None and cfg.vision_config is None and not cfg.has_towers
    lm = {n: p.shape for n, p in full.named_parameters() if not n.startswith(("audio_tower.", "visual."))}
    assert {n: p.shape for n, p in text_only.named_parameters()} == lm
    towers = {n: p.shape for n, p in full.named_parameters() if n not in lm}
    assert towers == {n.removeprefix("model."): p.shape for n, p in hf.thinker.named_parameters()
                      if n.startswith(("model.audio_tower.", "model.visual."))}
    batch = media_batch(MIXED[1:2])
    with pytest.raises(ValueError, match="built without its vision tower .*towers=True"):
        text_only(batch["input_ids"], batch["attention_mask"], media_inputs=media_inputs(batch))
    with pytest.raises(ValueError, match="no thinker_config.audio_config"):
        ThinkerConfig.from_dict({"text_config": cfg.to_hf_text_config()}, towers=True)


def test_encode_media_is_hfs_towers(with_towers):
    """Our towers inside the thinker, loaded from the released layout (thinker.audio_tower.*,
    thinker.visual.*), give exactly transformers' get_audio/image/video_features."""
    hf, ours = with_towers
    batch = media_batch(MIXED)
    with torch.no_grad():
        ref, out = hf_media(hf, batch), ours.encode_media(media_inputs(batch))
    assert [m.modality for m in out] == [m.modality for m in ref] == ["audio", "image", "video"]
    for a, b in zip(ref, out):
        assert a.embeds.abs().max() > 0.1  # unit-scale towers: a meaningful scale for the tolerance
        assert (a.embeds - b.embeds).abs().max() <= 1e-6, a.modality
        assert len(a.deepstack) == len(b.deepstack) == (0 if a.modality == "audio" else 2)
        for x, y in zip(a.deepstack, b.deepstack):
            assert (x - y).abs().max() <= 1e-6, a.modality


def test_fp32_logits_with_our_towers_match_hf_left_padded(with_towers):
    """MediaInputs in: text-only, image, two images, audio, and video + image + audio rows."""
    hf, ours = with_towers
    batch = media_batch(MIXED)
    ids, mask, mi = batch["input_ids"], batch["attention_mask"], media_inputs(batch)
    with torch.no_grad():
        ref = hf.thinker(**batch).logits
        out = ours(ids, mask, media_inputs=mi)
        # the towers run once, their outputs reused (what the trainer does for teacher and student)
        reused = ours(ids, mask, media=ours.encode_media(mi), media_inputs=mi)
    diff = masked_max_diff(out, ref, mask)
    print(f"thinker + our towers, fp32 logits max diff vs HF: {diff:.2e}")
    assert out.shape == ref.shape and diff <= 1e-5
    assert torch.equal(reused, out)


def test_prompt_plus_completion_positions_cover_the_whole_sequence(with_towers):
    """Training passes prompt + completion at once (completions right-padded): the MRoPE positions
    come from rope_index over the whole sequence, as transformers computes them."""
    hf, ours = with_towers
    batch = media_batch(MIXED, seed=5)
    g = torch.Generator().manual_seed(6)
    completion = torch.randint(1000, 150000, (len(MIXED), 4), generator=g)
    completion_mask = torch.ones_like(completion)
    completion_mask[-1, 2:] = 0  # the last row's completion is shorter
    full = dict(batch, input_ids=torch.cat([batch["input_ids"], completion.masked_fill(completion_mask == 0, 0)], 1),
                attention_mask=torch.cat([batch["attention_mask"], completion_mask], 1))
    with torch.no_grad():
        ref = hf.thinker(**full).logits
        out = ours(full["input_ids"], full["attention_mask"], media_inputs=media_inputs(full))
    assert masked_max_diff(out, ref, full["attention_mask"]) <= 1e-5


def test_audio_in_video_with_our_towers_matches_hf(with_towers):
    hf, ours = with_towers
    batch = media_batch(AIV_ROWS)
    with torch.no_grad():
        ref = hf.thinker(**batch, use_audio_in_video=True).logits
        out = ours(batch["input_ids"], batch["attention_mask"], media_inputs=media_inputs(batch, True))
    diff = masked_max_diff(out, ref, batch["attention_mask"])
    print(f"audio-in-video, thinker + our towers, fp32 logits max diff vs HF: {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("rows, use_audio_in_video", [([MIXED[1], MIXED[3], MIXED[4], MIXED[0]], False),
                                                      (AIV_ROWS[:2], True)], ids=["media", "audio_in_video"])
def test_greedy_generate_with_our_towers_matches_hf(with_towers, rows, use_audio_in_video):
    hf, ours = with_towers
    batch = media_batch(rows, seed=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = hf.thinker.generate(**batch, use_audio_in_video=use_audio_in_video, max_new_tokens=4,
                                  min_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
        tokens, _ = generate(ours, ids, mask, 4, eos_ids=[ours.cfg.vocab_size + 1], pad_id=0,
                             media_inputs=media_inputs(batch, use_audio_in_video))
    assert torch.equal(tokens, ref[:, ids.shape[1]:])


def _tower_lora_names(model):
    return [n for n, _ in lora_parameters(model) if n.startswith(("audio_tower.", "visual."))]


@pytest.mark.parametrize("freeze_vit, freeze_aligner", [(False, True), (True, False), (False, False)])
def test_lora_on_the_towers_changes_their_outputs_only_with_lora_on(omni_saved, freeze_vit, freeze_aligner):
    """--freeze_vit / --freeze_aligner false: LoRA on the towers' linear layers (ms-swift's split);
    the teacher (LoRA off) sees the base towers' outputs, the student others, and the gradient
    reaches the towers' LoRA. By default the towers get none."""
    _, path = omni_saved
    batch = media_batch(MIXED)
    mi = media_inputs(batch)
    base = load_thinker(path, dtype=torch.float32, towers=True)
    assert not _tower_lora_names(inject_lora(base, rank=4, alpha=8, dropout=0.0) and base)
    with torch.no_grad():
        want = base.encode_media(mi)
    model = load_thinker(path, dtype=torch.float32, towers=True)
    summary = inject_lora(model, rank=4, alpha=8, dropout=0.0, freeze_vit=freeze_vit, freeze_aligner=freeze_aligner)
    parts = tuple(part for part, frozen in (("vit", freeze_vit), ("aligner", freeze_aligner)) if not frozen)
    assert summary.targets[-len(parts):] == parts
    names = _tower_lora_names(model)
    aligner = [n for n in names if n.startswith(("audio_tower.proj", "visual.merger"))]
    assert bool(aligner) == (not freeze_aligner) and (len(aligner) < len(names)) == (not freeze_vit)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora" not in n)
    randomize_B_(model, std=0.1)
    with torch.no_grad():
        on = model.encode_media(mi)
        with lora_disabled(model):
            off = model.encode_media(mi)
    for w, a, b in zip(want, off, on):
        assert torch.equal(w.embeds, a.embeds) and all(map(torch.equal, w.deepstack, a.deepstack))
        assert (b.embeds - a.embeds).abs().max() > 1e-3, b.modality
    model.train()
    model(batch["input_ids"], batch["attention_mask"], media_inputs=mi).square().mean().backward()
    grads = {n: p.grad for n, p in lora_parameters(model) if n in names}
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())


def test_peft_loads_our_tower_lora_and_matches_logits(omni_saved, tmp_path):
    """The adapter keeps PEFT's names for transformers' thinker (base_model.model.model.audio_tower...,
    ...model.visual...): PEFT wraps exactly our modules and gives our logits on a media batch."""
    from peft import PeftModel
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from lora import LoRALinear, _hf_name

    _, path = omni_saved
    model = load_thinker(path, dtype=torch.float32, towers=True)
    inject_lora(model, rank=4, alpha=8, dropout=0.0, targets="ALL", freeze_vit=False, freeze_aligner=False)
    randomize_B_(model, seed=1, std=0.1)
    save_adapter(model, str(tmp_path))
    thinker = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).thinker
    peft = PeftModel.from_pretrained(thinker, str(tmp_path)).eval()
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft.named_modules()
               if hasattr(m, "lora_A") and "experts" not in n}
    assert wrapped == {_hf_name(n) for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    batch = media_batch(MIXED)
    with torch.no_grad():
        ref = peft(**batch).logits
        out = model.eval()(batch["input_ids"], batch["attention_mask"], media_inputs=media_inputs(batch))
    assert masked_max_diff(out, ref, batch["attention_mask"]) <= 1e-5


def test_merged_export_with_tower_lora_loads_in_transformers(omni_saved, tmp_path):
    """export_merged folds the towers' LoRA into their weights (the base's tower tensors are not
    carried over as well): transformers loads the result and gives our LoRA-on logits."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from lora import export_merged
    from weights import _shard_map

    _, path = omni_saved
    model = load_thinker(path, dtype=torch.float32, towers=True)
    inject_lora(model, rank=4, alpha=8, dropout=0.0, freeze_vit=False, freeze_aligner=False)
    randomize_B_(model, seed=2, std=0.1)
    export_merged(model, str(tmp_path), dtype=torch.float32, base_path=path)
    assert set(_shard_map(str(tmp_path))) == set(_shard_map(path))  # every tensor once
    exported = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32).thinker
    batch = media_batch(MIXED)
    with torch.no_grad():
        ref = exported.eval()(**batch).logits
        out = model.eval()(batch["input_ids"], batch["attention_mask"], media_inputs=media_inputs(batch))
    assert masked_max_diff(out, ref, batch["attention_mask"]) <= 1e-5


def test_towers_under_zero3_with_two_processes(omni_saved, tmp_path):
    """selfkd.build_student(towers=True) under ZeRO-3 on 2 CPU processes: the towers stream from
    the released layout into the partitions and give HF's logits, while the two ranks' batches
    hold different media (one rank text-only, then images vs audio + video). Then a training
    step with LoRA on the towers and media on one rank only: no rank waits for a gather the other
    never makes, and the audio tower's LoRA moves."""
    hf, path = omni_saved
    rounds = [("eval", [MIXED[1:], MIXED[:1] + [[("text", 4)]]]),
              ("eval", [MIXED[1:2], [[("text", 2), audio(120), ("text", 1), ("video", (2, 4, 4), 0.5), ("text", 1)]]]),
              ("train", [MIXED[3:4], MIXED[:1]])]
    work, refs = [], []
    for kind, per_rank in rounds:
        batches = [media_batch(rows, seed=7) for rows in per_rank]
        has_media = ["input_features" in b or "pixel_values" in b or "pixel_values_videos" in b for b in batches]
        work.append((kind, [(b["input_ids"], b["attention_mask"], media_inputs(b) if m else None)
                            for b, m in zip(batches, has_media)]))
        if kind == "eval":
            with torch.no_grad():
                refs.append([(hf.thinker(**b).logits[..., ::VOCAB_STRIDE], b["attention_mask"]) for b in batches])
    torch.save(work, tmp_path / "rounds.pt")
    # the suite's two-process ZeRO-3 runs have DeepSpeed's accelerator answer "no fp16" (conftest.py); this
    # one answers "fp16", as recent Intel CPUs do: the worker's check_weights holds both to float32
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", SELFKD_TEST_CPU_FP16="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "tests", "zero3_omni.py"), path, str(tmp_path / "rounds.pt"),
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for (ref, mask), out in zip((r[rank] for r in refs), results):
            diff = masked_max_diff(out, ref, mask)
            print(f"ZeRO-3 rank {rank}: fp32 logits max diff vs HF {diff:.2e}")
            assert diff <= 1e-5
        assert results[-1] > 0  # the audio tower's LoRA B, zero before the step
