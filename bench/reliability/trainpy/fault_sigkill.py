"""Fault: the training process is killed with SIGKILL mid-run (the kernel's out-of-memory killer does this)."""


def during_training(out, data):
    os.kill(os.getpid(), signal.SIGKILL)
