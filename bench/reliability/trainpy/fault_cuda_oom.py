"""Fault: the GPU runs out of memory (torch raises its out-of-memory error)."""


def during_training(out, data):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by the reliability suite)")
