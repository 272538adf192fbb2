import importlib.util
import os

import pytest

# Every process of the suite (this one and all it starts, through PYTHONPATH) gets DeepSpeed's CPU
# accelerator answering "no fp16", the answer that once made ZeRO-3 build bfloat16 partitions for a
# float32 run (tests/machine/sitecustomize.py), whatever this CPU answers. SELFKD_TEST_CPU_FP16=1
# runs the suite with the other answer; tests that need one answer set it themselves.
MACHINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "machine")
os.environ.setdefault("SELFKD_TEST_CPU_FP16", "0")
os.environ["PYTHONPATH"] = os.pathsep.join([MACHINE, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
_spec = importlib.util.spec_from_file_location("selfkd_test_machine", os.path.join(MACHINE, "sitecustomize.py"))
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded default checkpoint (tiny.py: a tiny random Qwen3-Omni with its towers, in the
    released layout, and its tokenizer), written once."""
    from tiny import ensure_default_model

    return ensure_default_model(os.path.join(tmp_path_factory.mktemp("tiny"), "tiny-qwen3-omni"))


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    """A text-only tiny thinker with a compact 1024-id vocabulary (tiny.py's tokenizer with the added
    tokens right after the BPE ids) and no towers: the model of the trainer's text-path tests. The
    embedded default's real 152064-id vocabulary makes each step ~6x slower on CPU; the tests that
    exercise it (test_tiny, test_cross_modal, the omni tests, run.sh's) use tiny_model_dir."""
    from dataclasses import replace

    from chat import load_tokenizer
    from tiny import tiny_thinker_config, write_random_checkpoint, write_tiny_tokenizer

    path = str(tmp_path_factory.mktemp("text") / "tiny-text")
    write_tiny_tokenizer(path, real_ids=False)
    cfg = replace(tiny_thinker_config(), vocab_size=load_tokenizer(path).vocab_size, audio_config=None,
                  vision_config=None)
    return write_random_checkpoint(cfg, path, seed=0, std=0.15)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The embedded default's tokenizer alone (tiny.py: real special-token ids), written once."""
    from tiny import write_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tok(tiny_dir):
    from chat import load_tokenizer

    return load_tokenizer(tiny_dir)

