"""Fault: the disk fills up just before the checkpoint is saved.

Fills the run folder until the file system says ENOSPC (the suite mounts a small tmpfs there when
it may), but never writes more than 64 MiB: on a big disk it removes its filler and makes the
checkpoint write fail with ENOSPC instead, after writing part of the file.
"""

FILL_CAP = 64 << 20


def during_training(out, data):
    import errno

    import torch

    filler, written, full = out / "filler.bin", 0, False
    with open(filler, "wb") as f:
        try:
            while written < FILL_CAP:
                f.write(b"\0" * (1 << 16))
                f.flush()
                written += 1 << 16
        except OSError as e:
            full = e.errno == errno.ENOSPC
    if full:
        print(f"disk full after {written} bytes of filler", flush=True)
        return
    filler.unlink()

    def save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    torch.save = save
