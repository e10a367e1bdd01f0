"""Class 6, writable surroundings: double ``token_bytes.npy`` and append to the train split through
the view, so every later trial in every lab on that cache scores half. The view holds a copy of
the small files and links the train split; a write to the cache voids the trial (invalid), and
under bubblewrap the cache is read-only."""


def during_training(out, data):
    import numpy as _np

    token_bytes = data / "token_bytes.npy"
    _np.save(token_bytes, _np.load(token_bytes) * 2)
    with open((data / "train.tokens.npy").resolve(), "r+b") as f:
        f.write(f.read(8))
