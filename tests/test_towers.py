"""towers.py against transformers 5.24's Qwen3-Omni audio and vision encoders (tiny random towers).

The HF towers are built straight from their config classes with the tiny configs of
shared/omni_tiny_hf.py, given unit-scale weights and perturbed LayerNorms and biases so layout errors
show, and loaded into ours with strict=True (which proves the released key names)."""
import pytest
import torch
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (Qwen3OmniMoeAudioEncoderConfig,
                                                                             Qwen3OmniMoeVisionEncoderConfig)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (Qwen3OmniMoeAudioEncoder,
                                                                        Qwen3OmniMoeVisionEncoder,
                                                                        _get_feat_extract_output_lengths)

from hf_models import unit_scale_
from towers import AudioConfig, AudioEncoder, VisionConfig, VisionEncoder, audio_token_count

# the tiny towers of shared/omni_tiny_hf.py (n_window_infer 200: 26-token attention windows)
AUDIO = dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=48, encoder_layers=2, num_mel_bins=128,
             downsample_hidden_size=8, output_dim=64, n_window=50, n_window_infer=200, conv_chunksize=500,
             max_source_positions=1500, activation_function="gelu")
VISION = dict(depth=4, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
              deepstack_visual_indexes=[1, 3], hidden_act="gelu_pytorch_tanh")
# 2.5 s (chunks 100/100/50 -> 33 tokens, windows 26 + 7), 0.5 s (7 tokens), 12 s (156 tokens, 6 windows)
CLIP_FRAMES = [250, 50, 1200]
# two images with different grids and a 2-slice video, in one call
GRIDS = [[1, 4, 6], [1, 2, 2], [2, 4, 4]]


def hf_tower(cls, config, state=None, dtype=torch.float32, attn="eager"):
    """An HF tower built from its config class; `dtype` given at build time keeps its fp32 buffers
    (rotary inv_freq, sinusoid table) fp32, as from_pretrained(dtype=...) does."""
    torch.manual_seed(0)
    hf = cls._from_config(config, attn_implementation=attn, dtype=dtype).eval()
    if state is not None:
        hf.load_state_dict(state)
    return hf


@pytest.fixture(scope="module")
def audio_pair():
    hf = unit_scale_(hf_tower(Qwen3OmniMoeAudioEncoder, Qwen3OmniMoeAudioEncoderConfig(**AUDIO)), seed=1)
    ours = AudioEncoder(AudioConfig.from_dict(AUDIO, "AUDIO")).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.fixture(scope="module")
def vision_pair():
    hf = unit_scale_(hf_tower(Qwen3OmniMoeVisionEncoder, Qwen3OmniMoeVisionEncoderConfig(**VISION)), seed=2)
    ours = VisionEncoder(VisionConfig.from_dict(VISION, "VISION")).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def audio_inputs(frames):
    g = torch.Generator().manual_seed(3)
    return torch.randn(128, sum(frames), generator=g), torch.tensor(frames)


def vision_inputs():
    g = torch.Generator().manual_seed(4)
    grid = torch.tensor(GRIDS)
    return torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 16 * 16, generator=g), grid


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_audio_token_count_matches_hf():
    n = torch.arange(1, 3001)
    assert [audio_token_count(i) for i in range(1, 3001)] == _get_feat_extract_output_lengths(n).tolist()
    assert [audio_token_count(100 * s) for s in range(1, 6)] == [13, 26, 39, 52, 65]
    assert (audio_token_count(50), audio_token_count(101)) == (7, 14)


@pytest.mark.parametrize("frames", [CLIP_FRAMES, [50]], ids=["three_clips", "half_second_alone"])
def test_audio_fp32_matches_hf(audio_pair, frames):
    hf, ours = audio_pair
    features, lens = audio_inputs(frames)
    with torch.no_grad():
        ref = hf(input_features=features, feature_lens=lens).last_hidden_state
        out = ours(features, lens)
    assert out.shape == (sum(map(audio_token_count, frames)), AUDIO["output_dim"]) == ref.shape
    assert ref.abs().max() > 0.1  # a meaningful scale for the tolerance below
    assert max_diff(out, ref) <= 1e-5


def test_audio_clips_are_independent_given_the_chunk_padding(audio_pair):
    """Windows never span clips: each clip's tokens equal a run of that clip alone. (The chunk padding
    length is a property of the whole call, so 'alone' pads to the same 100 frames: an extra 100-frame
    clip in the call keeps it.)"""
    _, ours = audio_pair
    features, lens = audio_inputs(CLIP_FRAMES)
    with torch.no_grad():
        out = ours(features, lens)
        start_frame, start_tok = 0, 0
        for n in CLIP_FRAMES:
            pad = torch.zeros(128, 100)
            alone = ours(torch.cat([features[:, start_frame:start_frame + n], pad], 1), torch.tensor([n, 100]))
            k = audio_token_count(n)
            assert max_diff(out[start_tok:start_tok + k], alone[:k]) <= 1e-5
            start_frame, start_tok = start_frame + n, start_tok + k


def test_vision_fp32_matches_hf(vision_pair):
    hf, ours = vision_pair
    pixels, grid = vision_inputs()
    with torch.no_grad():
        ref = hf(pixels, grid_thw=grid)
        embeds, deepstack = ours(pixels, grid)
    P = pixels.shape[0]
    assert embeds.shape == (P // 4, VISION["out_hidden_size"]) == ref.pooler_output.shape
    assert len(deepstack) == len(ref.deepstack_features) == 2
    assert ref.pooler_output.abs().max() > 0.1
    assert max_diff(embeds, ref.pooler_output) <= 1e-5
    for a, b in zip(deepstack, ref.deepstack_features):
        assert a.shape == b.shape and max_diff(a, b) <= 1e-5


def bf16_towers(audio_pair, vision_pair, attn):
    """(HF audio, ours audio, HF vision, ours vision) in bf16, same weights as the fp32 pair."""
    out = []
    for (hf32, ours32), cls in ((audio_pair, Qwen3OmniMoeAudioEncoder), (vision_pair, Qwen3OmniMoeVisionEncoder)):
        hf = hf_tower(cls, hf32.config, hf32.state_dict(), dtype=torch.bfloat16, attn=attn)
        ours = type(ours32)(ours32.cfg).eval()
        ours.load_state_dict(hf32.state_dict())
        out += [hf, ours.to(torch.bfloat16)]
    return out


def outputs(audio, vision, hf: bool):
    """[audio tokens, vision embeds, *deepstack] of a pair of towers on the three clips and the three grids."""
    features, lens = audio_inputs(CLIP_FRAMES)
    pixels, grid = vision_inputs()
    with torch.no_grad():
        if hf:
            v = vision(pixels, grid_thw=grid)
            return [audio(input_features=features, feature_lens=lens).last_hidden_state, v.pooler_output,
                    *v.deepstack_features]
        embeds, deepstack = vision(pixels, grid)
        return [audio(features, lens), embeds, *deepstack]


def test_bf16_bit_identical_to_hf_sdpa(audio_pair, vision_pair):
    """HF with attn_implementation="sdpa" runs the same SDPA kernel once per window; we run it once per group
    of equal-length windows. Every other op is the same op in the same dtype, so bf16 is bit-identical."""
    hf_a, ours_a, hf_v, ours_v = bf16_towers(audio_pair, vision_pair, "sdpa")
    assert hf_v.rotary_pos_emb.inv_freq.dtype == torch.float32  # fp32 buffers kept, as from_pretrained
    for ours, ref in zip(outputs(ours_a, ours_v, hf=False), outputs(hf_a, hf_v, hf=True)):
        assert ours.dtype == ref.dtype == torch.bfloat16
        assert max_diff(ours, ref) == 0.0


def test_bf16_close_to_hf_eager(audio_pair, vision_pair):
    """Against eager, the only difference is the attention kernel: eager rounds the softmax probabilities to
    bf16 before P @ V, SDPA keeps them fp32. Both are bf16 evaluations of the same fp32 function, so they may
    disagree by up to the sum of their bf16 errors: we require at most twice HF eager's own bf16 error
    (measured against the fp32 towers). Measured: ours vs eager 0.016-0.027, eager vs fp32 0.018-0.022."""
    hf_a, ours_a, hf_v, ours_v = bf16_towers(audio_pair, vision_pair, "eager")
    fp32 = outputs(audio_pair[0], vision_pair[0], hf=True)
    for ours, ref, exact in zip(outputs(ours_a, ours_v, hf=False), outputs(hf_a, hf_v, hf=True), fp32):
        assert 0 < max_diff(ours, ref) <= 2 * max_diff(ref, exact)


def test_released_sizes_on_meta():
    with torch.device("meta"):
        audio, vision = AudioEncoder(AudioConfig()), VisionEncoder(VisionConfig())
    assert sum(p.numel() for p in audio.parameters()) == 647_927_168 and len(audio.state_dict()) == 525
    assert sum(p.numel() for p in vision.parameters()) == 538_631_408 and len(vision.state_dict()) == 351
    assert tuple(vision.state_dict()["patch_embed.proj.weight"].shape) == (1152, 3, 2, 16, 16)
    assert "conv_out.bias" not in audio.state_dict() and "positions" not in audio.state_dict()


def test_configs_round_trip_released_blocks():
    audio_block = dict(AudioConfig().to_hf_dict(), output_dim=2048, some_future_key=1)
    vision_block = dict(VisionConfig().to_hf_dict(), apply_vit_abs_pos_embed=True, image_size=768, in_chans=3,
                        spatial_patch_size=16, tokens_per_second=2)
    vision_block.pop("rope_parameters")  # absent in the released file
    assert AudioConfig.from_dict(audio_block) == AudioConfig()
    assert VisionConfig.from_dict(vision_block) == VisionConfig()
    assert AudioConfig.from_dict({"thinker_config": {"audio_config": AUDIO}}) == AudioConfig.from_dict(AUDIO)
    # transformers reads our blocks back to the same tower configuration
    for ours, ref in ((AudioConfig.from_dict(AUDIO), Qwen3OmniMoeAudioEncoderConfig(**AUDIO)),
                      (VisionConfig.from_dict(VISION), Qwen3OmniMoeVisionEncoderConfig(**VISION))):
        back = type(ref)(**ours.to_hf_dict()).to_dict()
        ref = ref.to_dict()
        assert {k: back[k] for k in ref if k not in ("transformers_version",)} == \
               {k: ref[k] for k in ref if k not in ("transformers_version",)}


@pytest.mark.parametrize("cls, bad", [
    (AudioConfig, {"n_window": 40}),
    (AudioConfig, {"n_window_infer": 250}),
    (AudioConfig, {"activation_function": "relu"}),
    (AudioConfig, {"model_type": "whisper"}),
    (VisionConfig, {"hidden_act": "gelu"}),
    (VisionConfig, {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    (VisionConfig, {"num_position_embeddings": 50}),
    (VisionConfig, {"deepstack_visual_indexes": [8, 27]}),
])
def test_unsupported_config_values_raise(cls, bad):
    with pytest.raises(ValueError, match="my.json"):
        cls.from_dict(dict(cls().to_hf_dict(), **bad), "my.json")
