"""Test-only: this machine answers a capability question the way another machine would.

Python imports `sitecustomize` at start-up from its path, so every process whose PYTHONPATH holds
this folder answers the same: pytest's own (conftest.py loads this file) and every process a test
starts (dist workers, torchrun's ranks, run.sh's Python), as conftest.py puts the folder on
PYTHONPATH for the whole suite.

SELFKD_TEST_CPU_FP16=0|1 (unset: the machine's own answer): what DeepSpeed's CPU accelerator says
to is_fp16_supported(). It asks oneDNN, which says yes on recent Intel CPUs (AVX512-FP16 / AMX)
and no elsewhere (e.g. AMD Zen 3), and DeepSpeed 0.19's zero.Init chose the partitions' dtype
by it (docs/deepspeed-dtype-bug.md). The accelerator module is patched as it is imported, so a
process that never imports DeepSpeed pays nothing.
"""
import importlib.abc
import importlib.util
import os
import sys

ANSWER = os.environ.get("SELFKD_TEST_CPU_FP16")
MODULE = "deepspeed.accelerator.cpu_accelerator"


class _AnswerFp16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)  # the real spec, found by the other finders
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.CPU_Accelerator.is_fp16_supported = lambda accelerator: ANSWER == "1"

        spec.loader.exec_module = exec_module
        return spec


if ANSWER in ("0", "1") and not any(isinstance(f, _AnswerFp16) for f in sys.meta_path):
    sys.meta_path.insert(0, _AnswerFp16())
