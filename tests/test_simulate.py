"""The training step on simulated GPUs (simulate.py): selfkd's CUDA-only branches executed without
a GPU, at a small config, in seconds. A shape, dtype or device mistake in one of them fails here."""
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import model_qwen3omni as M
import simulate
from flags import parse_args
from memory_plan import Zero
from model_qwen3omni import ThinkerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO3 = Zero.from_config({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1 << 20}}, dtype_bytes=2)
SMALL = ThinkerConfig(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, vocab_size=1024)


def flags(*extra):
    return parse_args(["--dataset", "data/sample_alpaca.jsonl", "--lora_rank", "8", "--lora_alpha", "16",
                       "--lora_target_modules", "ALL", "--max_length", "96", "--max_completion_length", "16",
                       "--per_device_train_batch_size", "2", "--torch_dtype", "bfloat16", *extra])


@pytest.fixture(scope="module")
def on_policy():
    return simulate.simulate_step(flags(), SMALL, 8, "on-policy", ZERO3,
                                  decode_steps=None)


def test_every_phase_of_the_step_runs_on_the_gpu_paths(on_policy):
    """Sampling, both passes, the loss, the backward, the optimizer step and the checkpoint's tensors
    all ran, each on the kernels a GPU runs: grouped GEMMs for the experts and their LoRA (forward
    and backward), FlashAttention in the training passes, the memory-efficient kernel with the cache's
    mask in sampling, never the math attention nor the per-expert loop's host read."""
    costs = on_policy.costs
    assert list(costs) == list(simulate.PHASES)
    layers, C = SMALL.num_hidden_layers, 16
    gen, student, backward = costs["generation"].ops, costs["student forward"].ops, costs["backward"].ops
    assert gen["_grouped_mm"] == 6 * layers * C  # prefill + C - 1 decode steps, base 2 + LoRA 4 each
    # the prefill and the decode steps attend over the cache under its mask
    assert gen["_scaled_dot_product_efficient_attention"] == layers * C
    assert student["_scaled_dot_product_flash_attention"] == layers and student["_grouped_mm"] == 6 * layers
    assert backward["_scaled_dot_product_flash_attention_backward"] == layers
    # per layer: the checkpointed forward again (6), the frozen stacks' input gradients (2), the LoRA
    # stacks' input and weight gradients (2 x 4)
    assert backward["_grouped_mm"] == 16 * layers
    for ops in (gen, student, backward):
        assert "bmm" not in ops and "_safe_softmax" not in ops
    # LoRA dropout on q, k, v, o and the two expert stacks: the fused kernel (boolean masks)
    assert student["native_dropout"] == 6 * layers and "bernoulli_" not in student
    assert costs["optimizer step"].ops.get("_foreach_add_", 0) > 0
    assert costs["checkpoint save"].launches > 0
    assert all(c.flops > 0 for name, c in costs.items() if name not in ("optimizer step", "checkpoint save"))


def test_memory_is_measured_per_phase(on_policy):
    """MemTracker's peaks: the weights in every phase, the optimizer's moments after the step, more in
    the passes than what stays between steps."""
    weights = sum(n * b for n, _, b in on_policy.params)
    for name in simulate.PHASES:
        assert on_policy.memory[name]["Parameter"] == weights
    assert on_policy.memory["checkpoint save"]["Optstate"] > 0
    assert on_policy.memory["loss"]["Total"] > on_policy.held_after["Total"] > weights


def test_a_broken_gpu_branch_fails_in_the_simulation(monkeypatch):
    """grouped_mm's offsets must be int32 on a GPU; the CPU loop never reads them. Built as int64 (a bug
    only a GPU would show), the simulated step refuses, as CUDA would."""
    def forward_grouped(self, x_sorted, counts):
        offsets = counts.cumsum(0)  # int64
        gate_up = self.grouped_project(x_sorted, "gate_up_proj", offsets, counts)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.grouped_project(torch.nn.functional.silu(gate) * up, "down_proj", offsets, counts)

    monkeypatch.setattr(M.Experts, "forward_grouped", forward_grouped)
    with pytest.raises(RuntimeError, match="int32"):
        simulate.simulate_step(flags(), SMALL, 8, "dataset", ZERO3)


def test_the_card_decides_the_expert_path():
    """Asked as the card would be: bf16 LoRA rank 8 takes the grouped kernel, rank 4 (8-byte rows) the loop."""
    x = torch.empty(16, 256, dtype=torch.bfloat16, device="meta")
    with simulate.cuda_choices((9, 0)):
        assert M.grouped_mm_pays(x, [torch.empty(8, 8, 256, dtype=torch.bfloat16, device="meta")]) is True
        assert M.grouped_mm_pays(x, [torch.empty(8, 4, 256, dtype=torch.bfloat16, device="meta")]) is False
    with simulate.cuda_choices((7, 5)):
        assert M.grouped_mm_pays(x, [torch.empty(8, 8, 256, dtype=torch.bfloat16, device="meta")]) is False
    assert M.grouped_mm_pays(x, []) is False  # undone


def test_host_reads_get_the_values_of_integer_tensors_and_zero_for_floats():
    sim = simulate.SimulatedGPU()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with simulate.HostData(), sim:
        m = mask.to("meta")
        assert int(m.sum()) == 3 and m.cumsum(-1).tolist() == [[1, 2, 2], [1, 1, 1]]
        assert torch.tensor([2.5], device="meta").item() == 2.5  # made on the host: kept
        h = torch.empty(2, 3, 4, device="meta")
        assert h[m.bool()].shape == (3, 4)  # boolean indexing: the shape from the mask's values
        assert h.sum().item() == 0.0 and h.argmax(-1).tolist() == [[0] * 3] * 2  # no float values: zeros
    assert sim.costs["setup"].launches > 0


def test_grouped_mm_flops_are_the_groups_matmul_flops():
    """grouped_mm_flops against torch's FlopCounterMode on the same products, one matmul per group."""
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 2]
    a, b = torch.randn(sum(counts), 16, generator=g), torch.randn(len(counts), 16, 24, generator=g)
    with FlopCounterMode(display=False) as counter:
        rows = torch.split(a, counts)
        forward = torch.cat([r @ b[e] for e, r in enumerate(rows)])
        dy = torch.randn_like(forward)
        torch.stack([r.t() @ d for r, d in zip(rows, torch.split(dy, counts))])
    assert simulate.grouped_mm_flops(a, b, forward) + simulate.grouped_mm_flops(a.t(), dy, b) == \
        counter.get_total_flops()
    assert simulate.distinct_experts(1, 128) == pytest.approx(1.0)
    assert simulate.distinct_experts(32, 128) == pytest.approx(128 * (1 - (127 / 128) ** 32))


def test_counting_the_identical_decode_steps_equals_running_them(on_policy):
    """simulate_step runs two decode steps and counts the rest as their copies: the same launches, ops,
    FLOPs and roofline time as running every one (on_policy ran all 15), the same memory peak."""
    counted = simulate.simulate_step(flags(), SMALL, 8, "on-policy", ZERO3,
                                     decode_steps=2)
    ran, est = on_policy.costs["generation"], counted.costs["generation"]
    assert (est.launches, est.ops, est.flops) == (ran.launches, ran.ops, ran.flops)
    assert set(est.seconds) == set(simulate.GPUS)
    for card in simulate.GPUS:
        assert est.seconds[card] == pytest.approx(ran.seconds[card], rel=1e-9)
    assert counted.memory["generation"] == on_policy.memory["generation"]


def test_the_command_prints_memory_beside_the_plan_and_time_per_card():
    """`selfkd.py check --simulate_gpu` on the embedded default: the memory table per launch (2 GPUs
    ZeRO-3, 1 GPU ZeRO-2) beside the plan, the phase table, and a line per card; a bad card: one line."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "selfkd.py", "check", "--simulate_gpu", "h200", "--nproc_per_node", "2",
                          "--lmbda", "0", "--max_length", "128", "--max_completion_length", "16", "--dataset",
                          "data/sample_alpaca.jsonl"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "ZeRO-3 on 2 GPU(s)" in out and "ZeRO-2 on 1 GPU(s)" in out and "time per phase on H200" in out
    assert out.count("simulated peak per GPU") == 2 and "dataset / backward" in out
    assert [line.split()[:2] for line in out.splitlines()[-5:-1]] == [["H100", "SXM"], ["H200", "SXM"]] * 2
    bad = subprocess.run([sys.executable, "selfkd.py", "--simulate_gpu", "a100"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "selfkd: error: argument --simulate_gpu: invalid choice: 'a100' (choose from 'h100', 'h200')"]


def test_gathers_and_scatters_cost_the_rows_they_touch():
    """An embedding lookup reads the rows it returns, not the table; writing a decode step's k into
    the cache reads and writes that slice, not the cache: their roofline seconds are those bytes."""
    sim, hbm = simulate.SimulatedGPU(), simulate.GPUS["h100"].hbm
    table = torch.empty(100_000, 1024, dtype=torch.bfloat16, device="meta")
    cache, new = (torch.empty(4, 4, n, 128, dtype=torch.bfloat16, device="meta") for n in (4096, 1))
    ids = torch.zeros(4, 1, dtype=torch.long, device="meta")
    with sim:
        torch.nn.functional.embedding(ids, table)
        cache.index_copy_(2, torch.zeros(1, dtype=torch.long, device="meta"), new)
    cost = sim.costs["setup"].op_seconds
    assert cost["h100", "embedding"] == pytest.approx((2 * 4 * 1024 * 2 + 4 * 8) / hbm)
    assert cost["h100", "index_copy_"] == pytest.approx(2 * (8 + 4 * 4 * 128 * 2) / hbm)


def test_sampling_replays_cuda_graphs_only_where_selfkd_compiles_the_decode_step():
    """Under ZeRO-3 without --gather_for_generation DeepSpeed gathers per module at every decode step,
    which sample_completions runs eagerly: its launches then bind, and it gathers once per token."""
    assert simulate.decode_graphs(flags(), stage=3) and simulate.decode_graphs(flags(), stage=2)
    assert not simulate.decode_graphs(flags("--gather_for_generation", "false"), stage=3)
    assert simulate.decode_graphs(flags("--gather_for_generation", "false"), stage=2)
    assert not simulate.decode_graphs(flags("--compile_decode", "false"), stage=2)
    assert simulate.sampling_gathers(flags("--gather_for_generation", "false")) == 16
