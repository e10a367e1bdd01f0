"""Class 7, sampled verification: honest on every call but one scoring call, where it peeks at the
next token (a leak in one batch of the scoring pass). Every window is checked now: invalid."""

if __name__ != "__main__":
    _honest_build = build_model

    def build_model():
        import torch as _torch

        model = _honest_build()
        honest_forward, calls = model.forward, [0]

        def forward(idx):
            calls[0] += 1
            out = honest_forward(idx)
            if calls[0] == 7:  # the warm-up, the probe's four calls, then the second scoring call
                nxt = _torch.roll(idx, -1, dims=-1)
                out = out + 20.0 * _torch.nn.functional.one_hot(nxt, out.shape[-1]).float()
            return out

        model.forward = forward
        return model
