import os

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded default checkpoint (tiny.py: a tiny random Qwen3-Omni with its towers, in the
    released layout, and its tokenizer), written once."""
    from tiny import ensure_default_model

    return ensure_default_model(os.path.join(tmp_path_factory.mktemp("tiny"), "tiny-qwen3-omni"))
