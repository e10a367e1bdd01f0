"""Fault: host memory runs out: an address-space limit 256 MiB above the current size, then a 2 GiB allocation."""


def during_training(out, data):
    import resource

    import numpy as np

    pages = int(open("/proc/self/statm").read().split()[0])
    limit = pages * resource.getpagesize() + (256 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    np.ones(2 << 30, dtype=np.uint8)  # MemoryError
