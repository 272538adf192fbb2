"""What runs is what was asked, whatever the machine answers.

DeepSpeed 0.19's zero.Init took the partitions' dtype from the accelerator's fp16 answer (oneDNN
fp16: yes on recent Intel CPUs, no on e.g. AMD Zen 3) instead of the float32 it was given
(docs/deepspeed-dtype-bug.md). build_student no longer passes a dtype, and check_weights reads
what runs from the live tensors. Here: the checksum against its spec, a one-process ZeRO-3 build
in this process under both accelerator answers (partition dtype and contents against the
checkpoint read by the plain loader), and a wrong dtype or a corrupted partition refused with
one line naming the tensor. The whole suite runs with the accelerator answering "no fp16"
(conftest.py); tests/test_omni_model.py runs its two-process ZeRO-3 build once with "fp16".
And a compiled decode step runs on ZeRO-3's gathered weights (not on its per-module gathers)."""
import os
import subprocess
import sys

import pytest
import torch

import selfkd
from weights import CHECKSUM_MOD, checksum, held_here, load_thinker, zero3_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checksum_spec(t: torch.Tensor) -> int:
    """checksum, as its docstring says, in Python integers: word i (unsigned) times (i mod 2^15 + 1)
    times (i div 2^15 + 1), summed modulo the prime."""
    bits = {2: torch.int16, 4: torch.int32}[t.element_size()]
    words = t.reshape(-1).view(bits).tolist()
    unsigned = 1 << 8 * t.element_size()
    return sum((w % unsigned) * (i % 2**15 + 1) * (i // 2**15 + 1) for i, w in enumerate(words)) % CHECKSUM_MOD


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checksum_is_its_spec_and_sees_every_change(dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3 * 2**15 + 123, generator=g).to(dtype)  # several blocks, a partial last one
    assert checksum(t) == checksum(t, chunk=2**15) == checksum_spec(t)  # chunking changes nothing
    assert checksum(t[:0]) == 0
    changed, swapped = t.clone(), t.clone()
    changed.view({2: torch.int16, 4: torch.int32}[t.element_size()])[70000] ^= 1  # one ulp
    swapped[[5, 6]] = swapped[[6, 5]]
    assert len({checksum(t), checksum(changed), checksum(swapped), checksum(t.to(torch.float16)),
                checksum(t[:-1])}) == 5


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process gloo group for DeepSpeed in this process, for the module (DeepSpeed keeps the
    first group it sees: no other module of the suite makes one in-process), torn down after."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(29500 + (os.getpid() + 17) % 1000)), ("DS_ACCELERATOR", "cpu")):
            env.setenv(key, value)
        selfkd.init_distributed(selfkd.Config())
        yield
        torch.distributed.destroy_process_group()


def zero3_engine(model_dir):
    """selfkd's ZeRO-3 student on one process (the zero3_offload preset stays ZeRO-3 there), float32."""
    import deepspeed

    cfg = selfkd.Config(model=model_dir, torch_dtype="float32", deepspeed="zero3_offload", lora_rank=4,
                        lora_alpha=8, lora_dropout=0.0)
    ds = selfkd.deepspeed_config(cfg, torch.float32, world_size=1)
    assert ds["zero_optimization"]["stage"] == 3
    model, _, sums = selfkd.build_student(cfg, ds, torch.float32, torch.device("cpu"), log=lambda msg: None)
    optimizer = torch.optim.AdamW([p for _, p in selfkd.lora_parameters(model)], lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine, sums


def test_deepspeeds_shared_memory_op_is_not_built(one_rank_group):
    """DeepSpeed would compile it at start where a compiler exists (for inference_all_reduce, which
    selfkd never calls): every machine, with a compiler or not, starts without it."""
    from deepspeed.comm import comm

    assert comm.cdb is not None and comm.cdb.shm_comm_op is None


@pytest.mark.parametrize("fp16", [False, True], ids=["accelerator_without_fp16", "accelerator_with_fp16"])
def test_zero3_partitions_are_float32_and_equal_the_checkpoint(fp16, text_model_dir, one_rank_group, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda accelerator: fp16)
    engine, sums = zero3_engine(text_model_dir)
    line = selfkd.check_weights(engine, sums, torch.float32)
    reference = dict(load_thinker(text_model_dir, dtype=torch.float32).named_parameters())  # no DeepSpeed
    base = [(n, p) for n, p in engine.module.named_parameters() if ".lora." not in n]
    assert len(base) == len(sums) == len(reference) and all(hasattr(p, "ds_tensor") for _, p in base)
    for name, p in base:  # read from the live partitions, not from the flags
        assert held_here(p).dtype == torch.float32, name
        assert torch.equal(held_here(p), reference[name].reshape(-1)[zero3_slice(p)]), name
    for name, p in selfkd.lora_parameters(engine.module):
        assert p.ds_tensor.dtype == torch.float32, name
    assert all(m.dtype == torch.float32 for m in engine.optimizer.fp32_partitioned_groups_flat)
    assert line == (f"runs: base float32 in 1 ZeRO-3 partitions, {len(sums)} tensors equal to the checkpoint on "
                    "every rank; LoRA float32; optimizer master float32")


@pytest.mark.parametrize("fault", ["dtype", "contents"])
def test_a_wrong_partition_is_refused_naming_the_tensor(fault, text_model_dir, one_rank_group):
    engine, sums = zero3_engine(text_model_dir)
    p = engine.module.layers[1].mlp.experts.down_proj
    if fault == "dtype":  # what DeepSpeed's zero.Init built where the accelerator had no fp16
        p.ds_tensor.data = p.ds_tensor.data.to(torch.bfloat16)
    else:
        p.ds_tensor.data[7] += 1e-3
    with pytest.raises(selfkd.TrainingAborted) as refused:
        selfkd.check_weights(engine, sums, torch.float32)
    want = {"dtype": "rank 0: layers.1.mlp.experts.down_proj is bfloat16, asked float32",
            "contents": "rank 0: layers.1.mlp.experts.down_proj: this rank's partition differs from its slice "
                        "of the checkpoint (checksum)"}[fault]
    assert str(refused.value) == f"the model as built is not what was asked: {want}"


def test_zero_init_with_the_accelerators_dtype_stops_the_run_with_one_line(text_model_dir, tmp_path):
    """Through the CLI: DeepSpeed's zero.Init given dtype=float32 on an accelerator without fp16
    (tests/faulty_selfkd.py zero_init_dtype: the call selfkd made before) builds bfloat16
    partitions; the run stops before its first step with one line, exit code 1."""
    from test_reliability import SAMPLE, one_line_error

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", SELFKD_FAULT="zero_init_dtype",
               SELFKD_TEST_CPU_FP16="0")  # a process of its own (not one_rank_group's rank)
    args = ["--model", text_model_dir, "--dataset", f"{SAMPLE}#8", "--split_dataset_ratio", "0", "--torch_dtype",
            "float32", "--deepspeed", "zero3_offload", "--max_length", "128", "--max_completion_length", "8",
            "--teacher_sees_reference", "true", "--max_steps", "1", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "faulty_selfkd.py"), *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    one_line_error(result, r"^selfkd: error: the model as built is not what was asked: rank 0: \S+ is bfloat16, "
                           r"asked float32 \(and \d+ more\)$", code=1)
    assert "step 1 loss" not in result.stdout


def test_compiled_decode_under_zero3_runs_on_the_gathered_weights(one_rank_group, tmp_path):
    """ZeRO-3 with --gather_for_generation true: the compiled step samples (and picks greedily) the
    tokens of the eager one; with false, DeepSpeed's per-module gathers run eagerly and the step is
    not used. The default suite's compiled-decode test (tests/test_decode.py has the slow ones)."""
    from generate import CompiledStep
    from hf_models import left_padded_batch
    from test_decode import has_cpp_compiler, small_model
    from tiny import write_random_checkpoint

    write_random_checkpoint(small_model(layers=1).cfg, str(tmp_path), seed=0, std=0.15)
    engine, _ = zero3_engine(str(tmp_path))
    assert hasattr(next(engine.module.parameters()), "ds_id")  # partitioned
    ids, mask = left_padded_batch(512, [7, 4], seed=8)
    lines = []
    step = CompiledStep(engine.module, lines.append)

    def draw(gather, with_step, temperature=1.0):
        return selfkd.sample_completions(engine, ids, mask, torch.Generator().manual_seed(2), max_new_tokens=10,
                                         temperature=temperature, top_k=0, top_p=1.0, eos_ids=[7], pad_id=0,
                                         gather=gather, step=step if with_step else None)

    hooks = {name: list(m._backward_hooks.values()) for name, m in engine.module.named_modules() if m._backward_hooks}
    assert hooks  # DeepSpeed's gradient reduction on the leaf modules: compiled steps run without them
    per_module = draw(gather=False, with_step=True)
    assert not lines  # not compiled: hooks gather each module as it runs
    compiled, eager = draw(gather=True, with_step=True), draw(gather=True, with_step=False)
    # fullgraph: one graph, or a failure line
    assert len(lines) == 1 and ("compiled in" if has_cpp_compiler() else "torch.compile failed") in lines[0], lines
    greedy = draw(gather=True, with_step=True, temperature=0.0), draw(gather=True, with_step=False, temperature=0.0)
    assert all(torch.equal(a, b) for a, b in zip(*greedy))
    assert {name: list(m._backward_hooks.values()) for name, m in engine.module.named_modules()
            if m._backward_hooks} == hooks  # back for the training passes
    for a, b, c in zip(compiled, eager, per_module):
        assert torch.equal(a, b) and torch.equal(b, c)
