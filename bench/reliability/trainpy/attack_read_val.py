"""Gaming: train on the validation split (the unigram counts come from val.tokens.npy, not train)."""


def during_training(out, data):
    import numpy as np

    val = np.load(data / "val.tokens.npy")
    np.save(out / "val_copy.npy", val)
    np.load = lambda path, *a, **k: val  # the stand-in's own np.load of train.tokens.npy now gets val
