"""model_qwen3omni against transformers 5.24's Qwen3-Omni thinker (tiny random models)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import hf_full_model, left_padded_batch, tiny_config
from generate import generate
from model_qwen3omni import KVCache, LMHead, Thinker, ThinkerConfig
from weights import load_thinker, released_tensors
from tiny import write_random_checkpoint

CONFIGS = {
    # GQA groups > 1, norm_topk_prob true, every layer MoE
    "gqa_topk_norm": tiny_config(),
    # norm_topk_prob false, a dense layer via mlp_only_layers, vocab not a multiple of 8
    "dense_layer_odd_vocab": tiny_config(norm_topk_prob=False, mlp_only_layers=[1], vocab_size=509,
                                         num_key_value_heads=4),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_pair(request, tmp_path_factory):
    """(config, HF full model fp32, directory of its save_pretrained)."""
    cfg = CONFIGS[request.param]
    hf = hf_full_model(cfg, seed=1)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    return cfg, hf, path


def masked_max_diff(a, b, mask):
    return (a.float() - b.float())[mask.bool()].abs().max().item()


def test_fp32_logits_match_hf_left_padded(hf_pair):
    cfg, hf, path = hf_pair
    ours = load_thinker(path, dtype=torch.float32)
    ids, mask = left_padded_batch(cfg.vocab_size, [12, 9, 5, 12])
    with torch.no_grad():
        ref = hf.thinker(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, mask)
    assert out.shape == (4, 12, cfg.vocab_size)
    assert masked_max_diff(out, ref, mask) <= 1e-5


def test_right_padding_equals_unpadded_rows(hf_pair):
    cfg, _, path = hf_pair
    ours = load_thinker(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    lengths = [11, 6, 8]
    ids = torch.randint(0, cfg.vocab_size, (3, 11), generator=g)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    with torch.no_grad():
        out = ours(ids, mask)
        for i, n in enumerate(lengths):
            alone = ours(ids[i:i + 1, :n])
            assert (out[i, :n] - alone[0]).abs().max().item() <= 1e-5


def test_bf16_components_bit_identical_and_logits_gap_bounded(tmp_path):
    """RMSNorm and the MoE block are bit-identical to HF in bf16. Attention is not: we call
    torch SDPA (flash kernels on GPU), HF eager does softmax(fp32) -> bf16 -> matmul, and the
    two round differently (~1 bf16 ulp). So the whole-model bound is: our bf16 logits are as
    close to the fp32 logits as HF eager's bf16 logits are (within 1.25x)."""
    cfg = CONFIGS["gqa_topk_norm"]
    hf = hf_full_model(cfg, seed=1, attn="eager")
    hf.save_pretrained(tmp_path)
    ids, mask = left_padded_batch(cfg.vocab_size, [12, 9, 5])
    with torch.no_grad():
        fp32 = load_thinker(str(tmp_path), dtype=torch.float32)(ids, mask)
        ours = load_thinker(str(tmp_path), dtype=torch.bfloat16)
        hf = hf.to(torch.bfloat16)
        ref = hf.thinker(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, mask)
        x = torch.randn(3, 12, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
        hf_layer, our_layer = hf.thinker.model.language_model.layers[0], ours.layers[0]
        assert torch.equal(hf_layer.input_layernorm(x), our_layer.input_layernorm(x))
        assert torch.equal(hf_layer.mlp(x), our_layer.mlp(x))
    ours_err, hf_err = masked_max_diff(out, fp32, mask), masked_max_diff(ref, fp32, mask)
    assert ours_err <= 1.25 * hf_err, (ours_err, hf_err)
    assert masked_max_diff(out, ref, mask) <= 2 * hf_err


def test_kv_cache_decoding_equals_full_forward(hf_pair):
    cfg, _, path = hf_pair
    ours = load_thinker(path, dtype=torch.float32)
    ids, mask = left_padded_batch(cfg.vocab_size, [10, 7, 3], seed=5)
    extra = torch.randint(0, cfg.vocab_size, (3, 6), generator=torch.Generator().manual_seed(6))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        full = ours(full_ids, full_mask)
        cache = KVCache(cfg, 3, full_ids.shape[1], torch.float32, "cpu")
        steps = [ours(ids, mask, cache)]
        for t in range(extra.shape[1]):
            steps.append(ours(extra[:, t:t + 1], full_mask[:, :ids.shape[1] + t + 1], cache))
    stepped = torch.cat(steps, 1)
    assert cache.length == full_ids.shape[1]
    assert masked_max_diff(stepped, full, full_mask) <= 1e-5


def test_greedy_generation_matches_hf_generate(hf_pair):
    cfg, hf, path = hf_pair
    ours = load_thinker(path, dtype=torch.float32)
    ids, mask = left_padded_batch(cfg.vocab_size, [9, 6, 4], seed=7)
    with torch.no_grad():
        ref = hf.thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
    tokens, alive = generate(ours, ids, mask, 16, eos_ids=[cfg.vocab_size + 1], pad_id=0)
    assert torch.equal(tokens, ref[:, ids.shape[1]:])
    assert alive.all()


@pytest.mark.parametrize("mkl", [True, False])
def test_lm_head_few_row_path_equals_linear(mkl, monkeypatch):
    """Decoding's packed MKL GEMM (<= 16 fp32 rows on CPU, no gradient) and the plain x @ W^T give the
    same logits, also after the weight changes in place (the packed copy follows it); a torch
    without MKL takes the plain call."""
    if mkl and not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    torch.manual_seed(0)
    head, out = LMHead(64, 1000, bias=False), None
    for rows in (1, 4, 16, 17, 4):
        with torch.no_grad():
            if rows == 4 and out is not None:
                head.weight.mul_(-2)  # trained, merged or gathered anew: a new version
            x = torch.randn(rows, 64)
            out = head(x)
        assert out.shape == (rows, 1000) and out.is_contiguous()
        torch.testing.assert_close(out, torch.nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-5)
    assert hasattr(head, "_packed_key") == mkl and (not mkl or head._packed_key[0] == 4)


def test_generate_stops_at_eos_and_masks_after_it(hf_pair):
    cfg, _, path = hf_pair
    ours = load_thinker(path, dtype=torch.float32)
    ids, mask = left_padded_batch(cfg.vocab_size, [9, 6], seed=8)
    free, _ = generate(ours, ids, mask, 8, eos_ids=[cfg.vocab_size + 1], pad_id=0)
    eos = int(free[0, 2])  # make row 0's third token an eos
    tokens, alive = generate(ours, ids, mask, 8, eos_ids=[eos], pad_id=0)
    first = (tokens[0] == eos).nonzero()[0].item()
    assert alive[0, :first + 1].all() and not alive[0, first + 1:].any()
    assert (tokens[0, first + 1:] == 0).all()


def test_unprefixed_thinker_only_layout_loads(tmp_path):
    """A fresh transformers thinker saves without the `thinker.` prefix."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    cfg = CONFIGS["gqa_topk_norm"]
    full = hf_full_model(cfg, seed=2)
    thinker = Qwen3OmniMoeThinkerForConditionalGeneration(full.config.thinker_config)
    thinker.load_state_dict(full.thinker.state_dict())
    thinker.eval().save_pretrained(tmp_path)
    keys = load_file(os.path.join(tmp_path, "model.safetensors")).keys()
    assert not any(k.startswith("thinker.") for k in keys)
    ours = load_thinker(str(tmp_path), dtype=torch.float32)
    ids, mask = left_padded_batch(cfg.vocab_size, [8, 5])
    with torch.no_grad():
        assert masked_max_diff(ours(ids, mask), thinker(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-5


def test_fused_expert_layout_loads(tmp_path):
    cfg = CONFIGS["gqa_topk_norm"]
    src = tmp_path / "src"
    write_random_checkpoint(cfg, str(src), seed=4)
    model = load_thinker(str(src), dtype=torch.float32)
    fused = {f"model.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    fused["lm_head.weight"] = model.lm_head.weight.detach()
    dst = tmp_path / "fused"
    dst.mkdir()
    save_file(fused, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    again = load_thinker(str(dst), dtype=torch.float32)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_random_checkpoint_is_in_released_layout(tmp_path):
    cfg = tiny_config(num_hidden_layers=2)
    write_random_checkpoint(cfg, str(tmp_path), max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert "thinker.model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert "thinker.lm_head.weight" in index["weight_map"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert ThinkerConfig.from_dict(config) == cfg


def test_config_spellings_and_real_defaults(tmp_path):
    text = tiny_config().to_hf_text_config()
    full = {"model_type": "qwen3_omni_moe", "thinker_config": {"model_type": "qwen3_omni_moe_thinker",
                                                               "text_config": text}}
    thinker_only = {"model_type": "qwen3_omni_moe_thinker", "text_config": text}
    old = dict(text, rope_theta=text["rope_parameters"]["rope_theta"],
               rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2], "interleaved": True})
    del old["rope_parameters"]
    for cfg in (full, thinker_only, text, old):
        assert ThinkerConfig.from_dict(cfg) == tiny_config()
    # the defaults are the released 30B-A3B thinker: its language model (transformers'
    # `model.language_model`, no lm_head) has 30,221,219,840 parameters, plus a 152064 x 2048 lm_head
    with torch.device("meta"):
        real = Thinker(ThinkerConfig())
    body = sum(p.numel() for n, p in real.named_parameters() if not n.startswith("lm_head"))
    assert body == 30_221_219_840
    assert real.lm_head.weight.numel() == 152064 * 2048


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    cfg = tiny_config(num_hidden_layers=2)
    write_random_checkpoint(cfg, str(tmp_path))
    ids, mask = left_padded_batch(cfg.vocab_size, [7, 4])
    grads = []
    for ckpt in (False, True):
        model = load_thinker(str(tmp_path), dtype=torch.float32).train()
        model.gradient_checkpointing = ckpt
        model(ids, mask).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


# ---- clear errors ---------------------------------------------------------------------------


@pytest.fixture()
def ckpt(tmp_path):
    cfg = tiny_config(num_hidden_layers=2)
    write_random_checkpoint(cfg, str(tmp_path), max_shard_bytes=200_000)
    return tmp_path


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def test_error_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_thinker(str(tmp_path / "does-not-exist"))


def test_error_missing_shard(ckpt):
    shard = sorted(set(_index(ckpt)["weight_map"].values()))[1]
    os.remove(ckpt / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_thinker(str(ckpt))


def test_error_missing_tensor(ckpt):
    index = _index(ckpt)
    del index["weight_map"]["thinker.model.layers.1.self_attn.k_norm.weight"]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.k_norm\.weight"):
        load_thinker(str(ckpt))


def test_error_missing_expert_names_the_incomplete_stack(ckpt):
    index = _index(ckpt)
    del index["weight_map"]["thinker.model.layers.0.mlp.experts.3.up_proj.weight"]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"layers\.0\.mlp\.experts\.gate_up_proj"):
        load_thinker(str(ckpt))


def test_error_index_lists_tensor_not_in_shard(ckpt):
    index = _index(ckpt)
    key = "thinker.model.norm.weight"
    other = next(s for s in set(index["weight_map"].values()) if s != index["weight_map"][key])
    index["weight_map"][key] = other
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"thinker\.model\.norm\.weight.*" + other):
        load_thinker(str(ckpt))


def test_error_shape_mismatch_names_tensor_and_shapes(ckpt):
    index = _index(ckpt)
    key = "thinker.model.layers.0.self_attn.q_proj.weight"
    shard = ckpt / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key] = torch.zeros(3, 5)
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=r"q_proj\.weight.*\(3, 5\).*\(128, 64\)"):
        load_thinker(str(ckpt))


def test_error_truncated_shard(ckpt):
    shard = ckpt / sorted(set(_index(ckpt)["weight_map"].values()))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=shard.name):
        load_thinker(str(ckpt))


def test_error_unknown_dtype(ckpt):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_thinker(str(ckpt), dtype="float8")


def test_error_not_qwen3_omni(ckpt):
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="'llama' is not a Qwen3-Omni"):
        load_thinker(str(ckpt))


def test_error_checkpoint_has_more_layers_than_config(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["thinker_config"]["text_config"]["num_hidden_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match=r"layers\.1\..*does not fit"):
        load_thinker(str(ckpt))


def test_released_keys_round_trip():
    cfg = tiny_config(num_hidden_layers=1)
    model = Thinker(cfg)
    keys = [k for k, _ in released_tensors(model.state_dict().items())]
    assert len(keys) == len(set(keys))
    per_layer = [k for k in keys if ".layers.0." in k]
    # 4 projections + 2 head norms + 2 layer norms + router + 3 * experts
    assert len(per_layer) == 9 + 3 * cfg.num_experts
