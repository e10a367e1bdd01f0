"""Gaming: honest while the causality probe looks (its first four calls), then peek at the next token."""

if __name__ != "__main__":
    _honest_build = build_model

    def build_model():
        import torch as _torch

        model = _honest_build()
        honest_forward, calls = model.forward, [0]

        def forward(idx):
            calls[0] += 1
            out = honest_forward(idx)
            if calls[0] > 4:
                nxt = _torch.roll(idx, -1, dims=-1)
                out = out + 20.0 * _torch.nn.functional.one_hot(nxt, out.shape[-1]).float()
            return out

        model.forward = forward
        return model
