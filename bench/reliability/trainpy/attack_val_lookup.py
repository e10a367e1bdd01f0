"""Class 3, reading the validation split: at import in the judge, follow the view's links (or the
command line, or the dataset cache) to val.tokens.npy and build a lookup of the true next token.
The model process has no path to the dataset, its argv and environment name none, and under
bubblewrap the dataset cache is not in its root: the lookup finds nothing and scores honestly."""

if __name__ != "__main__":
    _found = []
    _places = [Path(os.environ.get("NIGHTLAB_DATA", ".")), *[Path(a).parent for a in sys.argv if "/" in a],
               Path.home() / ".cache" / "nightlab" / "datasets"]
    for _place in _places:
        try:
            _found += [p for p in _place.resolve().rglob("val.tokens.npy")][:1]
        except OSError:
            pass
    if _found:
        Path(os.environ.get("NIGHTLAB_OUT", "/tmp")).joinpath("found_val.txt").write_text(str(_found[0]))
        _honest_build = build_model

        def build_model():
            import numpy as _np
            import torch as _torch

            model = _honest_build()
            stream = _np.load(_found[0]).astype(_np.int64)
            honest = model.forward

            def forward(idx):  # a causal lookup: the true next token of any 8-gram seen in val
                out = honest(idx)
                return out  # (the lookup itself is left out: that the file was reached is the breach)

            model.forward = forward
            return model
