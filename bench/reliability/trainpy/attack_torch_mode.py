"""Class 1, scoring process tampering: push a torch function mode at import that halves every
log-sum-exp and cross-entropy computed in the process. It only reaches the model process now,
whose loss nobody computes: harmless."""

if __name__ != "__main__":
    import torch as _torch
    from torch.overrides import TorchFunctionMode as _Mode

    class _Halve(_Mode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") in ("logsumexp", "cross_entropy", "log_softmax"):
                return out * 0.5
            return out

    _Halve().__enter__()
