"""lora.py against peft 0.21 on transformers 5.24's Qwen3-Omni thinker (tiny random models)."""
import json

import pytest
import torch

from hf_models import hf_full_model, left_padded_batch, tiny_config
from lora import (LoRAExperts, LoRALinear, export_merged, inject_lora, load_adapter, lora_disabled, lora_parameters,
                  merge_lora, save_adapter, unmerge_lora)
from model_qwen3omni import Thinker, ThinkerConfig
from weights import load_thinker

# hidden 64 and 2 * moe_intermediate 48 differ, so a transposed expert layout cannot pass by accident
CFG = tiny_config(num_hidden_layers=2, moe_intermediate_size=24)
TARGETS = {"attention": "q_proj,k_proj,v_proj,o_proj", "experts": "experts", "ALL": "ALL"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = hf_full_model(CFG, seed=3)
    path = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(path)
    return path


def hf_thinker(path):
    """transformers' thinker alone, with the weights saved in `path` (what PEFT wraps)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return full.thinker.eval()


def randomize_B_(model, seed=0, std=0.05):
    """Every LoRA B drawn from N(0, std): a trained-looking adapter (B = 0 is the base model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if name.endswith("B"):
                p.copy_(std * torch.randn(p.shape, generator=g))


def student(path, targets, seed=0, dropout=0.0):
    model = load_thinker(path, dtype=torch.float32)
    inject_lora(model, rank=4, alpha=8, dropout=dropout, targets=targets, seed=seed)
    randomize_B_(model, seed)
    return model.eval()


def max_diff(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("targets", list(TARGETS))
def test_peft_loads_our_adapter_and_matches_logits(hf_dir, tmp_path, targets):
    from peft import PeftModel

    ours = student(hf_dir, TARGETS[targets])
    save_adapter(ours, str(tmp_path))
    peft_model = PeftModel.from_pretrained(hf_thinker(hf_dir), str(tmp_path)).eval()
    ids, mask = left_padded_batch(CFG.vocab_size, [11, 7, 4])
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, mask)
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            ref_base = base(input_ids=ids, attention_mask=mask).logits
    assert max_diff(ref, ref_base, mask) > 1e-3  # the adapter really changes the output
    assert max_diff(out, ref, mask) <= 1e-5


@pytest.mark.parametrize("targets", ["attention", "ALL"])
def test_we_load_a_peft_adapter_and_match_logits(hf_dir, tmp_path, targets):
    """The other direction: an adapter PEFT itself created and saved (not our writer)."""
    from peft import LoraConfig, get_peft_model

    ours = student(hf_dir, TARGETS[targets])
    save_adapter(ours, str(tmp_path / "ours"))  # only to reuse the target spelling
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=cfg["target_modules"],
                          target_parameters=cfg["target_parameters"], exclude_modules=cfg["exclude_modules"],
                          init_lora_weights=False)
    torch.manual_seed(7)
    peft_model = get_peft_model(hf_thinker(hf_dir), peft_cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    fresh = load_thinker(hf_dir, dtype=torch.float32)
    inject_lora(fresh, rank=4, alpha=8, dropout=0.0, targets=TARGETS[targets])
    load_adapter(fresh, str(tmp_path / "peft"))
    ids, mask = left_padded_batch(CFG.vocab_size, [9, 5])
    with torch.no_grad():
        assert max_diff(fresh.eval()(ids, mask), peft_model(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-5


def test_lora_disabled_is_bit_identical_to_the_base(hf_dir):
    base = load_thinker(hf_dir, dtype=torch.float32).eval()
    model = student(hf_dir, "ALL")
    ids, mask = left_padded_batch(CFG.vocab_size, [10, 6])
    with torch.no_grad():
        ref = base(ids, mask)
        with lora_disabled(model):
            with lora_disabled(model):  # re-entrant
                inner = model(ids, mask)
            outer = model(ids, mask)
        after = model(ids, mask)
    assert torch.equal(inner, ref) and torch.equal(outer, ref)
    assert not torch.equal(after, ref)  # LoRA back on after the context
    assert all(m.lora_enabled for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts)))


def test_fresh_lora_student_equals_base_exactly_bf16(hf_dir):
    """B = 0 at init: the student IS the teacher, the self-distillation fixed point."""
    base = load_thinker(hf_dir, dtype=torch.bfloat16).eval()
    model = load_thinker(hf_dir, dtype=torch.bfloat16)
    inject_lora(model, rank=8, alpha=16, dropout=0.05, targets="ALL")
    ids, mask = left_padded_batch(CFG.vocab_size, [10, 6])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, mask), base(ids, mask))


def test_gradients_reach_only_lora_and_dropout_only_in_training(hf_dir):
    model = student(hf_dir, "ALL", dropout=0.5)
    ids, mask = left_padded_batch(CFG.vocab_size, [8, 8])
    model.train()
    model(ids, mask).square().mean().backward()
    for name, p in model.named_parameters():
        is_lora = ".lora" in name
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_lora, name
    with torch.no_grad():
        train_a, train_b = model(ids, mask), model(ids, mask)
        model.eval()
        eval_a, eval_b = model(ids, mask), model(ids, mask)
    assert not torch.equal(train_a, train_b)
    assert torch.equal(eval_a, eval_b)


def test_save_load_round_trip_is_exact(hf_dir, tmp_path):
    model = student(hf_dir, "ALL", seed=1)
    save_adapter(model, str(tmp_path))
    fresh = load_thinker(hf_dir, dtype=torch.float32)
    inject_lora(fresh, rank=4, alpha=8, dropout=0.0, targets="ALL", seed=2)
    load_adapter(fresh, str(tmp_path))
    for (n, a), (_, b) in zip(lora_parameters(model), lora_parameters(fresh)):
        assert torch.equal(a, b), n
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "selfkd" not in config  # PEFT's own keys only (an unknown key makes PEFT warn)
    extras = json.loads((tmp_path / "selfkd_adapter.json").read_text())
    assert extras == {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                                "targets": ["k_proj", "o_proj", "q_proj", "v_proj", "experts"],
                                "freeze_vit": True, "freeze_aligner": True}


def test_merge_unmerge_and_merged_export_loads_in_transformers(hf_dir, tmp_path):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model = student(hf_dir, "ALL")
    ids, mask = left_padded_batch(CFG.vocab_size, [9, 6])
    with torch.no_grad():
        want = model(ids, mask)
        merge_lora(model)
        merged = model(ids, mask)
        unmerge_lora(model)
        back = model(ids, mask)
    assert max_diff(merged, want, mask) <= 1e-5 and max_diff(back, want, mask) <= 1e-5
    export_merged(model, str(tmp_path), dtype=torch.float32, base_path=hf_dir)
    exported = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32).thinker
    with torch.no_grad():
        assert max_diff(exported.eval()(input_ids=ids, attention_mask=mask).logits, want, mask) <= 1e-5


def test_adapter_that_does_not_fit_fails_naming_the_tensor(hf_dir, tmp_path):
    model = student(hf_dir, "q_proj,v_proj")
    save_adapter(model, str(tmp_path / "qv"))
    other_rank = load_thinker(hf_dir, dtype=torch.float32)
    inject_lora(other_rank, rank=2, alpha=8, targets="q_proj,v_proj")
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight.*\(4, 64\).*\(2, 64\)"):
        load_adapter(other_rank, str(tmp_path / "qv"))
    other_targets = load_thinker(hf_dir, dtype=torch.float32)
    inject_lora(other_targets, rank=4, alpha=8, targets="q_proj,k_proj")
    with pytest.raises(KeyError, match=r"missing .*k_proj\.lora_A.*unexpected .*v_proj\.lora_A"):
        load_adapter(other_targets, str(tmp_path / "qv"))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(other_targets, str(tmp_path / "nowhere"))


def test_bad_targets_and_rank():
    model = Thinker(tiny_config(num_hidden_layers=1))
    with pytest.raises(ValueError, match="unknown target.*'qproj'"):
        inject_lora(model, targets="qproj")
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(Thinker(tiny_config(num_hidden_layers=1)), targets="gate_proj")  # no dense MLP layer
    with pytest.raises(ValueError, match="rank must be > 0"):
        inject_lora(model, rank=0)


def test_trainable_parameters_of_the_real_30b_thinker():
    """The figure quoted in the README: r=8, ALL, on the released config (meta device)."""
    with torch.device("meta"):
        model = Thinker(ThinkerConfig())
        summary = inject_lora(model, rank=8, alpha=16, dropout=0.05, targets="ALL")
    per_layer_attention = 8 * (2048 + 4096) * 2 + 8 * (2048 + 512) * 2
    per_layer_experts = 128 * 8 * ((2048 + 2 * 768) + (768 + 2048))
    assert summary.trainable == 48 * (per_layer_attention + per_layer_experts) == 321_257_472
    assert summary.total == 30_532_646_912 + summary.trainable
    assert summary.wrapped == 48 * 5
    assert f"{summary.percent:.2f}" == "1.04"
