"""Variant: logits with a column missing (vocabulary size - 1) and as integers. Invalid, with the
shape named."""

if __name__ != "__main__":
    _honest_build = build_model

    def build_model():
        model = _honest_build()
        honest_forward = model.forward
        model.forward = lambda idx: honest_forward(idx)[..., :-1].long()
        return model
