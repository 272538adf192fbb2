"""selfkd.main with one fault injected (test-only), chosen by the SELFKD_FAULT variable:

    kill_during_save=N    SIGKILL this process while it writes its N-th checkpoint
                          (after the adapter file, before the checkpoint is complete)
    enospc_during_save=N  the N-th checkpoint write fails with ENOSPC (disk full)
    safetensors_error_during_save=N  the N-th checkpoint's adapter write fails inside safetensors
    nan_loss=2,3          the training loss of these steps (1-based) is NaN
    peer_lost_after_save=N  the N-th checkpoint is written, then the collective that confirms it
                          fails as when another rank has died
    zero_init_dtype       DeepSpeed's zero.Init is given dtype=torch.float32, as selfkd once called it: where
                          the accelerator has no fp16, DeepSpeed 0.19 builds bfloat16 partitions instead
"""
import errno
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import selfkd  # noqa: E402

fault, _, arg = os.environ.get("SELFKD_FAULT", "").partition("=")
if fault in ("kill_during_save", "enospc_during_save", "safetensors_error_during_save"):
    real_write, saves = checkpoints.write_adapter, [0]

    def write_adapter(model, tensors, path):  # rank 0 only
        saves[0] += 1
        if saves[0] == int(arg) and fault == "safetensors_error_during_save":
            from safetensors import SafetensorError
            raise SafetensorError("Error while serializing: IoError(No space left on device)")
        real_write(model, tensors, path)
        if saves[0] == int(arg):
            if fault == "kill_during_save":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    checkpoints.write_adapter = write_adapter
elif fault == "nan_loss":
    bad_steps, real_branch, real_loss, current = {int(s) for s in arg.split(",")}, selfkd.is_on_policy, \
        selfkd.gkd_loss_sums, [0]

    def is_on_policy(step, seed, lmbda):  # called once per training step: remember which
        current[0] = step + 1
        return real_branch(step, seed, lmbda)

    def gkd_loss_sums(*args, **kwargs):
        jsd, sft, n = real_loss(*args, **kwargs)
        if torch.is_grad_enabled() and current[0] in bad_steps:
            jsd = jsd * float("nan")
        return jsd, sft, n

    selfkd.is_on_policy, selfkd.gkd_loss_sums = is_on_policy, gkd_loss_sums
elif fault == "peer_lost_after_save":
    real_broadcast, saves = checkpoints._broadcast_error, [0]

    def _broadcast_error(error):  # rank 0 has written the checkpoint; the other ranks confirm here
        saves[0] += 1
        if saves[0] == int(arg):
            raise RuntimeError("[gloo] Connection closed by peer")
        return real_broadcast(error)

    checkpoints._broadcast_error = _broadcast_error
elif fault == "zero_init_dtype":
    import deepspeed

    class Init(deepspeed.zero.Init):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **dict(kwargs, dtype=torch.float32))

    deepspeed.zero.Init = Init
elif fault:
    sys.exit(f"unknown SELFKD_FAULT {fault!r}")

selfkd.main()
