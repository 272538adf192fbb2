"""selfkd.main with one fault injected (test-only), chosen by the SELFKD_FAULT variable:

    kill_during_save=N    SIGKILL this process while it writes its N-th checkpoint
                          (after the adapter file, before the checkpoint is complete)
    enospc_during_save=N  the N-th checkpoint write fails with ENOSPC (disk full)
    nan_loss=2,3          the training loss of these steps (1-based) is NaN
"""
import errno
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import selfkd  # noqa: E402

fault, _, arg = os.environ.get("SELFKD_FAULT", "").partition("=")
if fault in ("kill_during_save", "enospc_during_save"):
    real_save, saves = selfkd.save_adapter, [0]

    def save_adapter(model, path):
        real_save(model, path)
        saves[0] += 1
        if saves[0] == int(arg):
            if fault == "kill_during_save":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    selfkd.save_adapter = save_adapter
elif fault == "nan_loss":
    bad_steps, real_branch, real_loss, current = {int(s) for s in arg.split(",")}, selfkd.is_on_policy, \
        selfkd.gkd_loss_sums, [0]

    def is_on_policy(cfg, step):  # called once per training step: remember which
        current[0] = step + 1
        return real_branch(cfg, step)

    def gkd_loss_sums(*args, **kwargs):
        jsd, sft, n = real_loss(*args, **kwargs)
        if torch.is_grad_enabled() and current[0] in bad_steps:
            jsd = jsd * float("nan")
        return jsd, sft, n

    selfkd.is_on_policy, selfkd.gkd_loss_sums = is_on_policy, gkd_loss_sums
elif fault:
    sys.exit(f"unknown SELFKD_FAULT {fault!r}")

selfkd.main()
