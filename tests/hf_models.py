"""Tiny random transformers Qwen3-Omni models, the reference the tests compare against.

transformers is a test-only dependency: nothing outside tests/ and bench/ imports it.
"""
import torch

from model_qwen3omni import ThinkerConfig


def tiny_config(**overrides) -> ThinkerConfig:
    """GQA (4 query heads per kv head), norm_topk_prob, every layer MoE."""
    base = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
                norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512)
    base.update(overrides)
    return ThinkerConfig(**base)


def hf_full_model(cfg: ThinkerConfig, seed: int = 0, attn: str = "sdpa"):
    """A full Qwen3OmniMoeForConditionalGeneration with tiny audio/vision towers (so it builds fast)
    and `cfg` as its thinker text config; save_pretrained writes the released layout."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeThinkerConfig

    text = cfg.to_hf_text_config()
    h = cfg.hidden_size
    audio = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                 output_dim=h, downsample_hidden_size=8, n_window=4, max_source_positions=64)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=h,
                  num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=4)
    thinker = Qwen3OmniMoeThinkerConfig(text_config=text, audio_config=audio, vision_config=vision,
                                        vision_start_token_id=cfg.vocab_size - 1)
    config = Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=False)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config).float()
    with torch.no_grad():  # the HF init leaves norms at 1 and the router at 0: randomise them too
        for name, p in model.thinker.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.config._attn_implementation = attn
    model.thinker.config._attn_implementation = attn
    model.thinker.config.text_config._attn_implementation = attn
    return model.eval()


def unit_scale_(hf, seed):
    """Weights at unit scale (std 1/sqrt(fan_in); HF's init std 0.02 leaves every GELU and softmax nearly
    linear / uniform, where a wrong variant would hide), LayerNorm weights 1 + noise, every bias noise
    (random init leaves them 1 / 0), so layout errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in n or "ln_" in n:
                p.copy_((1.0 if n.endswith(".weight") else 0.0) + 0.1 * noise)
            elif n.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:  # pos_embed rows: unit scale, like the activations they are added to
                p.copy_(noise / (p[0].numel() ** 0.5 if p.dim() > 1 and "pos_embed" not in n else 1.0))
    return hf


def left_padded_batch(vocab: int, lengths, seed: int = 0):
    """Random ids, left padded to the longest length: ids [B, T], mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab - 2, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask
