"""selfkd's command line: the ms-swift command's flags unchanged, and clear errors for bad ones."""

import json
import shlex

import pytest

from flags import Config, ConfigError, parse_args
from plan import fixed_point_warning

MS_SWIFT_COMMAND = """
--rlhf_type gkd --model MODEL --teacher_model MODEL --train_type lora --torch_dtype bfloat16
--lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 --lora_target_modules ALL
--dataset 'AI-ModelScope/alpaca-gpt4-data-zh#2000' --split_dataset_ratio 0.01
--max_length 2048 --max_completion_length 512 --dataloader_num_workers 4 --dataset_num_proc 4
--seq_kd false --lmbda 0.5 --temperature 2.0 --beta 0.5
--num_train_epochs 1 --per_device_train_batch_size 4 --per_device_eval_batch_size 4
--learning_rate 1e-5 --gradient_accumulation_steps 1 --warmup_ratio 0.05
--deepspeed zero3 --attn_impl flash_attention_2
--output_dir output --eval_steps 50 --save_steps 50 --save_total_limit 2
--logging_steps 5 --save_only_model true
"""


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "Qwen3-Omni-30B-A3B-Instruct"
    path.mkdir()
    return str(path)


def ms_swift_argv(model_dir, *extra):
    return shlex.split(MS_SWIFT_COMMAND.replace("MODEL", model_dir)) + list(extra)


def test_the_ms_swift_command_parses_unchanged(model_dir):
    c = parse_args(ms_swift_argv(model_dir))
    assert c == Config(
        rlhf_type="gkd", model=model_dir, teacher_model=model_dir, train_type="lora",
        torch_dtype="bfloat16", lora_rank=8, lora_alpha=16, lora_dropout=0.05,
        lora_target_modules=["ALL"], dataset=["AI-ModelScope/alpaca-gpt4-data-zh#2000"],
        split_dataset_ratio=0.01, max_length=2048, max_completion_length=512,
        dataloader_num_workers=4, dataset_num_proc=4, seq_kd=False, lmbda=0.5,
        temperature=2.0, beta=0.5, num_train_epochs=1.0, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=1e-5, gradient_accumulation_steps=1,
        warmup_ratio=0.05, deepspeed="zero3", attn_impl="flash_attention_2",
        output_dir="output", eval_steps=50, save_steps=50, save_total_limit=2,
        logging_steps=5, save_only_model=True,
    )
    # selfkd's own flags keep their defaults
    assert (c.seed, c.max_steps, c.resume_from_checkpoint) == (42, -1, None)
    assert c.gather_for_generation and c.gradient_checkpointing
    assert (c.sft_alpha, c.top_k, c.top_p, c.max_grad_norm, c.max_nonfinite_steps) == (0, 0, 1, 1, 5)
    assert (c.teacher_system, c.teacher_sees_reference, c.skip_bad_rows) == (None, False, False)


def test_defaults_and_extras(tmp_path):
    c = parse_args(["--dataset", "a.jsonl", "b.jsonl#10"])
    assert c.model is None and c.teacher_model is None  # None: the embedded default model
    assert c.deepspeed == "zero3" and c.dataset == ["a.jsonl", "b.jsonl#10"]
    assert c.save_total_limit is None  # keep all

    c = parse_args(["--dataset", "d", "--local_rank=3", "--save_total_limit", "none",
                    "--tuner_type", "lora", "--target_modules", "q_proj", "v_proj",
                    "--teacher_system", "Answer like an expert.", "--max_steps", "10",
                    "--top_k", "20", "--top_p", "0.9", "--deepspeed", "zero3_offload"])
    assert c.lora_target_modules == ["q_proj", "v_proj"] and c.save_total_limit is None
    assert (c.teacher_system, c.max_steps, c.top_k, c.top_p) == ("Answer like an expert.", 10, 20, 0.9)
    assert c.deepspeed == "zero3_offload"


@pytest.mark.parametrize("text,value", [("true", True), ("TRUE", True), ("1", True),
                                        ("False", False), ("0", False)])
def test_bool_values(text, value):
    assert parse_args(["--dataset", "d", "--seq_kd", text]).seq_kd is value


def test_bare_bool_flag_means_true():
    assert parse_args(["--dataset", "d", "--teacher_sees_reference"]).teacher_sees_reference


@pytest.mark.parametrize("flag,value", [
    ("seq_kd", "maybe"), ("save_only_model", "yes"),
    ("rlhf_type", "dpo"), ("train_type", "full"), ("torch_dtype", "float16"), ("torch_dtype", "fp8"),
    ("lmbda", "1.5"), ("lmbda", "-0.1"), ("beta", "2"), ("beta", "-1"),
    ("temperature", "0"), ("temperature", "-1"),
    ("lora_rank", "0"), ("lora_alpha", "0"), ("lora_dropout", "1"), ("lora_dropout", "-0.1"),
    ("max_completion_length", "0"), ("max_completion_length", "2048"), ("max_length", "0"),
    ("per_device_train_batch_size", "0"), ("per_device_eval_batch_size", "-1"),
    ("gradient_accumulation_steps", "0"), ("learning_rate", "0"),
    ("warmup_ratio", "1.5"), ("warmup_ratio", "-0.1"),
    ("split_dataset_ratio", "1"), ("split_dataset_ratio", "-0.1"),
    ("save_total_limit", "0"), ("eval_steps", "0"), ("save_steps", "-5"), ("logging_steps", "0"),
    ("top_p", "0"), ("top_p", "1.1"), ("top_k", "-1"), ("sft_alpha", "-1"),
    ("max_steps", "0"), ("num_train_epochs", "0"), ("max_grad_norm", "-1"),
    ("weight_decay", "-0.1"), ("adam_beta1", "1"), ("adam_beta2", "1.5"), ("adam_epsilon", "0"),
    ("max_nonfinite_steps", "0"), ("attn_impl", "xformers"), ("lr_scheduler_type", "step"),
    ("deepspeed", "zero1"), ("deepspeed", "missing.json"),
    ("resume_from_checkpoint", "/no/such/checkpoint"), ("lmbda", "abc"), ("lora_rank", "8.5"),
])
def test_invalid_value_names_the_flag(flag, value):
    with pytest.raises(ConfigError, match=f"--{flag}"):
        parse_args(["--dataset", "d", f"--{flag}", value])


def test_specific_messages(tmp_path):
    with pytest.raises(ConfigError, match="GKD requires the model to have LoRA adapters"):
        parse_args(["--dataset", "d", "--train_type", "full"])
    with pytest.raises(ConfigError, match="bfloat16"):
        parse_args(["--dataset", "d", "--torch_dtype", "float16"])
    with pytest.raises(ConfigError, match="--dataset"):
        parse_args([])
    bad_json = tmp_path / "ds.json"
    bad_json.write_text("{not json")
    with pytest.raises(ConfigError, match="--deepspeed .*JSON"):
        parse_args(["--dataset", "d", "--deepspeed", str(bad_json)])
    good_json = tmp_path / "ds_ok.json"
    good_json.write_text('{"zero_optimization": {"stage": 3}}')
    assert parse_args(["--dataset", "d", "--deepspeed", str(good_json)]).deepspeed == str(good_json)


def test_unknown_flag_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"unknown flag --learning_rat \(did you mean --learning_rate\?\)"):
        parse_args(["--dataset", "d", "--learning_rat", "1e-5"])
    with pytest.raises(ConfigError, match=r"unknown flag --lora_rnk .*--lora_rank"):
        parse_args(["--dataset", "d", "--lora_rnk=8"])
    with pytest.raises(ConfigError, match="unknown flag --lr"):  # no prefix matching
        parse_args(["--dataset", "d", "--lr", "1e-5"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_args(["--dataset", "d", "--lmbda", "0.5", "0.3"])


def test_teacher_must_be_the_model(model_dir, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match="--teacher_model .*LoRA disabled.*no second model"):
        parse_args(ms_swift_argv(model_dir, "--teacher_model", str(other)))
    with pytest.raises(ConfigError, match="--teacher_model .*needs --model"):
        parse_args(["--dataset", "d", "--teacher_model", model_dir])

    assert parse_args(ms_swift_argv(model_dir, "--teacher_model", model_dir + "/")).model == model_dir
    monkeypatch.chdir(tmp_path)  # relative and absolute spellings of one directory
    assert parse_args(ms_swift_argv(model_dir, "--teacher_model", "./Qwen3-Omni-30B-A3B-Instruct"))
    assert parse_args(["--dataset", "d", "--model", model_dir]).teacher_model is None


def test_describe_and_warnings(model_dir):
    c = parse_args(ms_swift_argv(model_dir))
    lines = c.describe().splitlines()
    assert len(lines) == len(c.__dataclass_fields__)
    assert "lmbda:" in c.describe() and "dataset:" in c.describe()
    value_columns = {len(line) - len(line.split(":", 1)[1].lstrip(" ")) for line in lines}
    assert len(value_columns) == 1  # values start in one column
    assert any(line.split(":")[0] == "deepspeed" and line.endswith(" zero3") for line in lines)

    assert "student == teacher" in fixed_point_warning(teacher_differs=0, sft_alpha=0.0, resuming=False)
    assert fixed_point_warning(teacher_differs=3, sft_alpha=0.0, resuming=False) is None
    assert fixed_point_warning(teacher_differs=0, sft_alpha=0.1, resuming=False) is None
    assert fixed_point_warning(teacher_differs=0, sft_alpha=0.0, resuming=True) is None


@pytest.mark.parametrize("key,value", [("mics_shard_size", 2), ("zero_hpz_partition_size", 2),
                                       ("zero_quantized_weights", True)])
def test_deepspeed_json_with_a_partitioning_the_loader_cannot_fill_is_rejected(key, value, model_dir, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, key: value}}))
    with pytest.raises(ConfigError, match=rf"zero_optimization\.{key} = {value} is not supported"):
        parse_args(ms_swift_argv(model_dir, "--deepspeed", str(path)))
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "mics_shard_size": -1}}))
    assert parse_args(ms_swift_argv(model_dir, "--deepspeed", str(path))).deepspeed == str(path)


def test_optimizer_state_is_kept_only_on_rank_0(monkeypatch):
    """Saving gathers each tensor collectively, but only rank 0 (the writer) may keep them: the
    30B model's LoRA optimizer state is ~3.9 GB, once per rank otherwise."""
    import types

    import deepspeed.utils
    import torch

    import checkpoints

    param = torch.nn.Parameter(torch.ones(3))
    engine = types.SimpleNamespace(module=None)
    monkeypatch.setattr(checkpoints, "lora_parameters", lambda module: [("layer.lora_A", param)])
    monkeypatch.setattr(deepspeed.utils, "safe_get_full_fp32_param", lambda p: p.detach() * 2)
    monkeypatch.setattr(deepspeed.utils, "safe_get_full_optimizer_state", lambda p, key: p.detach() * 3)
    for rank, expected in ((1, set()), (0, {"layer.lora_A.fp32", "layer.lora_A.exp_avg", "layer.lora_A.exp_avg_sq"})):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        assert set(checkpoints.optimizer_tensors(engine)) == expected
