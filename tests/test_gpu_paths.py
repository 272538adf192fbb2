"""The branches only a GPU takes, executed without one.

On the meta device tensors have shapes and dtypes but no data, and torch's meta kernels check
what the CUDA kernels would (grouped_mm: bf16 operands, 16-byte rows). On fake CUDA tensors
(FakeTensorMode) only the device is asked. What a CPU cannot answer is forced, each in one place:
`Experts.grouped` (grouped_mm_pays asks for a real CUDA device) and
`torch.cuda.get_device_capability` (no CUDA in this torch build)."""
import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lora import inject_lora
from model_qwen3omni import Experts, SparseMoE, ThinkerConfig, grouped_mm_pays

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


@pytest.mark.parametrize("dtype, capability, rank, pays", [
    (torch.bfloat16, (9, 0), 8, True),  # H100 / H200, the ms-swift command's LoRA
    (torch.bfloat16, (8, 0), 8, True),  # A100: F.grouped_mm runs from sm80
    (torch.bfloat16, (7, 5), 8, False),  # older: no grouped kernel
    (torch.float32, (9, 0), 8, False),  # other dtypes would take the kernel's per-group fallback
    (torch.bfloat16, (9, 0), 4, False),  # rank 4 in bf16: 8-byte rows, refused by the kernel
])
def test_grouped_mm_pays_answers_as_a_gpu_would(dtype, capability, rank, pays, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(16, 256, dtype=dtype, device="cuda")
        stacks = [torch.empty(8, 2 * 128, 256, dtype=dtype, device="cuda"),  # gate_up [E, 2I, H]
                  torch.empty(8, rank, 256, dtype=dtype, device="cuda")]  # a LoRA A stack [E, r, H]
        assert grouped_mm_pays(x, stacks) is pays
    assert grouped_mm_pays(torch.empty(16, 256, dtype=dtype), []) is False  # CPU: never


def gpu_moe(rank: int):
    """A SparseMoE at the released expert width with LoRA, bf16, on the meta device, on its GPU path."""
    cfg = ThinkerConfig(num_hidden_layers=1, num_experts=16)  # 2048 wide, 768 per expert, top-8
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            block = torch.nn.Module()
            block.mlp = SparseMoE(cfg)
            inject_lora(block, rank=rank, alpha=2 * rank, dropout=0.05, targets="experts", seed=0)
    finally:
        torch.set_default_dtype(default)
    experts = block.mlp.experts
    experts.grouped = True  # what grouped_mm_pays answers on a GPU in bf16
    return cfg, block.mlp, experts


def test_the_gpu_expert_path_runs_forward_and_backward_in_bf16():
    """Experts.forward_grouped with LoRA's grouped projections, as training runs it on a GPU: the meta
    kernels accept every grouped_mm call (bf16, aligned), and the LoRA gradients have their shapes."""
    cfg, moe, experts = gpu_moe(rank=8)
    x = torch.empty(2, 64, cfg.hidden_size, dtype=torch.bfloat16, device="meta", requires_grad=True)
    calls = []
    real = experts.forward_grouped
    experts.forward_grouped = lambda *a: calls.append(1) or real(*a)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and calls == [1]
    lora = [p for name, p in experts.named_parameters() if name.startswith("lora.")]
    grads = torch.autograd.grad(y.float().sum(), [x, *lora])
    assert [g.shape for g in grads] == [x.shape, *(p.shape for p in lora)]
    assert all(g.dtype == torch.bfloat16 for g in grads)


def test_the_alignment_grouped_mm_pays_checks_is_the_kernels():
    """LoRA rank 4 in bf16 has 8-byte rows: grouped_mm_pays keeps the loop because the grouped kernel
    refuses them, which forcing the grouped path shows."""
    cfg, moe, experts = gpu_moe(rank=4)
    x = torch.empty(1, 32, cfg.hidden_size, dtype=torch.bfloat16, device="meta")
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        moe(x)


def test_an_eager_decode_step_at_the_released_width_takes_the_gpu_paths():
    """bench_decode's count of the kernels a decode step launches on a GPU runs the released 48-layer
    thinker with LoRA on ALL in bf16 on the meta device: one attention kernel per layer on the
    cache's kv heads (no copy of k and v per query head), and per MoE layer two grouped matmuls for
    the experts and four for their LoRA (no per-expert loop, no copy of the routed weights: on a GPU
    in bf16 the grouped path pays, also for a decode step)."""
    from bench_decode import released_width_kernels

    total, ops = released_width_kernels(batch=4, prompt=256, completion=64)
    layers = ThinkerConfig().num_hidden_layers
    assert ops["_scaled_dot_product_efficient_attention"] == layers and "repeat_interleave" not in ops
    assert ops["_grouped_mm"] == 6 * layers
    # the grouped path's own gathers: the token rows and their weights into expert order, per layer
    # (the routed path would index the weight stacks too: 6 more per layer)
    assert ops["index"] == 2 * layers and ops["index_put_"] == layers and ops["sort"] == layers
    assert Experts.grouped is None  # the forced answer is undone
    assert total > 50 * layers  # eager: launch-bound, what --compile_decode's CUDA graphs replay as one
