"""Variant: add 1e8 to every logit, so that fp32 log-sum-exp rounds the loss toward zero. The scorer
refuses logits above 1e4 in magnitude (and shifts each row by its maximum anyway): invalid."""

if __name__ != "__main__":
    _honest_build = build_model

    def build_model():
        model = _honest_build()
        honest_forward = model.forward
        model.forward = lambda idx: honest_forward(idx) + 1e8
        return model
