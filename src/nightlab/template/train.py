"""
Pretrain a small GPT for a fixed wall-clock budget. This is the file the research agents edit.

Run it on its own inside a lab (`python train.py`) or through `nightlab train`. The lab gives it
the training split, the time budget and the device; at the end it hands the lab its model, and
a trusted evaluator in another process measures validation bits per byte.

Rules of the game: train only through `lab.train_loader`, stop when the budget is spent (seconds
of training, or `lab.budget_tokens` training tokens when the lab sets one), keep `build_model()`
importable without training, and let `forward(idx)` return logits.
"""

import gc
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from nightlab.lab import session

lab = session.connect()

# ---------------------------------------------------------------------------
# Hyperparameters (the GPU preset; the CPU preset below shrinks the model)
# ---------------------------------------------------------------------------

DEPTH = 8  # number of transformer layers
ASPECT_RATIO = 64  # model width = DEPTH * ASPECT_RATIO
HEAD_DIM = 128  # width of one attention head
SEQ_LEN = 2048  # tokens per training row
TOTAL_BATCH_SIZE = 2**18  # tokens per optimizer step
DEVICE_BATCH_SIZE = 64  # rows per forward pass (gradient accumulation fills the rest)
LOGIT_CAP = 15.0  # soft cap on the output logits: cap * tanh(logits / cap)
ROPE_BASE = 10000.0  # rotary embedding base
EMBEDDING_LR = 0.6  # AdamW, token and value embeddings
UNEMBEDDING_LR = 0.004  # AdamW, output head
SCALAR_LR = 0.5  # AdamW, per-layer mixing scalars
MATRIX_LR = 0.04  # Muon, every 2-D matrix inside the blocks
WEIGHT_DECAY = 0.4  # Muon weight decay, decayed to zero with progress
ADAM_BETA1 = 0.8  # AdamW first-moment decay
ADAM_BETA2 = 0.95  # AdamW second-moment decay
MUON_MOMENTUM = 0.95  # Muon momentum after its warmup
MUON_MOMENTUM_START = 0.85  # Muon momentum at step 0
MUON_MOMENTUM_WARMUP_STEPS = 300  # steps to ramp the momentum
WARMUP_RATIO = 0.0  # share of the budget spent ramping the learning rate up
WARMDOWN_RATIO = 0.7  # share of the budget spent ramping the learning rate down
FINAL_LR_FRAC = 0.05  # learning rate at the end, as a share of the peak
VALUE_EMBED_WEIGHT_DECAY = 0.003  # AdamW decay on the value embeddings (token tables that memorize)
X0_INIT = 0.1  # initial weight of the embedding skip into every layer
COMPILE = True  # torch.compile the model on CUDA
WINDOW_PATTERN = "S"  # attention span per layer, repeated: L = the whole row, S = SHORT_WINDOW tokens
SHORT_WINDOW = 128  # tokens a short-window layer looks back (itself included); the last layer is always L

# The CPU preset: a tiny model that learns something in a minute on two cores.
CPU_DEPTH = 2  # layers
CPU_ASPECT_RATIO = 64  # width = CPU_DEPTH * CPU_ASPECT_RATIO
CPU_HEAD_DIM = 32  # head width
CPU_SEQ_LEN = 256  # tokens per row
CPU_TOTAL_BATCH_SIZE = 2**12  # tokens per optimizer step (one micro-batch: twice the steps of 2**13, lower val_bpb)
CPU_DEVICE_BATCH_SIZE = 16  # rows per forward pass

if lab.preset == "cpu":
    DEPTH, ASPECT_RATIO, HEAD_DIM = CPU_DEPTH, CPU_ASPECT_RATIO, CPU_HEAD_DIM
    SEQ_LEN, TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = CPU_SEQ_LEN, CPU_TOTAL_BATCH_SIZE, CPU_DEVICE_BATCH_SIZE

DEVICE = torch.device(lab.device)
ON_CUDA = DEVICE.type == "cuda"
MODEL_DIM = DEPTH * ASPECT_RATIO
N_HEAD = max(1, MODEL_DIM // HEAD_DIM)

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotate(x, cos, sin):
    """Rotary position embedding on the last dimension of x: [B, T, H, D]."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos + b * sin, b * cos - a * sin), dim=-1)


def window_of(layer):
    """How many tokens back layer `layer` attends (itself included); 0 means the whole row."""
    if layer == DEPTH - 1 or WINDOW_PATTERN[layer % len(WINDOW_PATTERN)] == "L":
        return 0
    return SHORT_WINDOW


def sliding_window(q, k, v, window):
    """Causal attention over the last `window` tokens. Compiled: FlexAttention skips the blocks
    outside the band. Eager (the evaluator, the CPU preset): SDPA with a boolean band mask."""
    T = q.size(-2)
    if window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if torch.compiler.is_compiling():
        def band(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < window)
        mask = create_block_mask(band, None, None, T, T, device=q.device)
        return flex_attention(q, k, v, block_mask=mask)
    i = torch.arange(T, device=q.device)
    mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def has_value_embedding(layer):
    """Value embeddings on every other layer, always including the last."""
    return layer % 2 == (DEPTH - 1) % 2


class Attention(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.q = nn.Linear(MODEL_DIM, N_HEAD * HEAD_DIM, bias=False)
        self.k = nn.Linear(MODEL_DIM, N_HEAD * HEAD_DIM, bias=False)
        self.v = nn.Linear(MODEL_DIM, N_HEAD * HEAD_DIM, bias=False)
        self.proj = nn.Linear(N_HEAD * HEAD_DIM, MODEL_DIM, bias=False)
        # Input-dependent gate on the value embedding, one scalar per head.
        self.ve_gate = nn.Linear(32, N_HEAD, bias=False) if has_value_embedding(layer) else None
        self.window = window_of(layer)

    def forward(self, x, ve, cos, sin):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, N_HEAD, HEAD_DIM)
        k = self.k(x).view(B, T, N_HEAD, HEAD_DIM)
        v = self.v(x).view(B, T, N_HEAD, HEAD_DIM)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :32]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, N_HEAD, HEAD_DIM)
        q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))
        if self.window:
            y = sliding_window(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.window)
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(MODEL_DIM, 4 * MODEL_DIM, bias=False)
        self.proj = nn.Linear(4 * MODEL_DIM, MODEL_DIM, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.attn = Attention(layer)
        self.mlp = MLP()

    def forward(self, x, ve, cos, sin):
        x = x + self.attn(norm(x), ve, cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, MODEL_DIM)
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(vocab_size, N_HEAD * HEAD_DIM) for i in range(DEPTH) if has_value_embedding(i)}
        )
        self.blocks = nn.ModuleList([Block(i) for i in range(DEPTH)])
        self.resid_scales = nn.Parameter(torch.ones(DEPTH))
        self.x0_scales = nn.Parameter(torch.full((DEPTH,), X0_INIT))
        self.head = nn.Linear(MODEL_DIM, vocab_size, bias=False)
        inv_freq = ROPE_BASE ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
        positions = max(2 * SEQ_LEN, 4096)  # the evaluator's context may be longer than training's
        angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)

    @torch.no_grad()
    def init_weights(self):
        bound = 3**0.5 * MODEL_DIM**-0.5  # uniform with std 1/sqrt(width)
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.head.weight, std=0.001)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        for block in self.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.mlp.fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        cos, sin = self.cos[:, :T].to(torch.bfloat16 if ON_CUDA else torch.float32), self.sin[:, :T]
        sin = sin.to(cos.dtype)
        # The residual stream runs in autocast's dtype (bf16 on CUDA), the tables stay in fp32 so
        # the optimizer's small updates to them are not rounded away. Outside autocast (the CPU
        # preset, the evaluator's fp32 probe) everything stays fp32.
        kind = idx.device.type
        stream = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32
        x = x0 = norm(self.embed(idx)).to(stream)
        for i, block in enumerate(self.blocks):
            x = self.resid_scales[i] * x + self.x0_scales[i] * x0
            ve = self.value_embeds[str(i)](idx).to(stream) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin)
        logits = self.head(norm(x)).float()
        logits = LOGIT_CAP * torch.tanh(logits / LOGIT_CAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def build_model():
    """The model with fresh weights, on the lab's device. The evaluator calls this too."""
    model = GPT(lab.vocab_size).to(DEVICE)
    model.init_weights()
    return model


def count_flops_per_token(model):
    """Training FLOPs per token: 6 per matrix weight, plus causal attention (half the full square)."""
    matrix_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    spans = [min(window_of(i) or SEQ_LEN, SEQ_LEN) for i in range(DEPTH)]
    keys = sum(w - w * w / (2 * SEQ_LEN) for w in spans)  # mean keys per query, summed over layers
    attention = 12 * keys * N_HEAD * HEAD_DIM  # causal full window: keys = SEQ_LEN / 2 a layer
    return 6 * matrix_params + attention


# ---------------------------------------------------------------------------
# Optimizer: Muon for the matrices in the blocks, AdamW for everything else
# ---------------------------------------------------------------------------

# Polar Express coefficients (Amsel et al., 2025): five steps toward the orthogonal polar factor.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(g):
    """Approximate U V^T of g = U S V^T for a stack of matrices [N, rows, cols], in bf16."""
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.mT if tall else x


def muon_update(params, grads, momentum_buf, second_buf, momentum, lr, wd):
    """One Muon step for a stack of same-shape matrices: Nesterov momentum, orthogonalize,
    normalize each output row's scale (NorMuon), cautious weight decay."""
    momentum_buf.lerp_(grads, 1 - momentum)
    g = grads.lerp(momentum_buf, momentum)
    u = orthogonalize(g).float()
    row_dim = -1 if u.size(-2) >= u.size(-1) else -2
    before = u.norm(dim=(-2, -1), keepdim=True)
    second_buf.lerp_(u.square().mean(dim=row_dim, keepdim=True), 1 - 0.95)
    u = u * second_buf.clamp_min(1e-10).rsqrt()
    u = u * (before / u.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    scale = max(1.0, params.size(-2) / params.size(-1)) ** 0.5
    decay = (u * params > 0).to(params.dtype) * wd
    params.sub_(lr * (scale * u + decay * params))


class Muon(torch.optim.Optimizer):
    """Muon over groups of same-shape matrices, updated as one stacked tensor each."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        # The update runs eagerly: compiling it (once per matrix shape) took 12 s more cold startup
        # on an H200 for 0.6 % more tokens/s, and the same val_bpb.
        for group in self.param_groups:
            params = group["params"]
            state = self.state[params[0]]
            stacked = torch.stack([p.data for p in params])
            grads = torch.stack([p.grad for p in params])
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(stacked)
                row_dim = -1 if stacked.size(-2) >= stacked.size(-1) else -2
                state["second"] = torch.zeros_like(stacked.mean(dim=row_dim, keepdim=True))
            muon_update(stacked, grads, state["momentum"], state["second"], group["momentum"], group["lr"],
                        group["weight_decay"])
            torch._foreach_copy_([p.data for p in params], list(stacked.unbind(0)))


def build_optimizers(model):
    lr_scale = (MODEL_DIM / 768) ** -0.5  # embedding rates were tuned at width 768
    matrices = [p for n, p in model.blocks.named_parameters() if "ve_gate" not in n]
    gates = [p for n, p in model.blocks.named_parameters() if "ve_gate" in n]
    by_shape = {}
    for p in matrices:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    muon = Muon([dict(params=ps) for ps in by_shape.values()], lr=MATRIX_LR, momentum=MUON_MOMENTUM,
                weight_decay=WEIGHT_DECAY)
    adam_groups = [
        dict(params=[model.embed.weight], lr=EMBEDDING_LR * lr_scale),
        dict(params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * lr_scale,
             weight_decay=VALUE_EMBED_WEIGHT_DECAY),
        dict(params=[model.head.weight], lr=UNEMBEDDING_LR * lr_scale),
        dict(params=[model.resid_scales], lr=SCALAR_LR * 0.01),
        dict(params=[model.x0_scales] + gates, lr=SCALAR_LR),
    ]
    adam = torch.optim.AdamW(adam_groups, betas=(ADAM_BETA1, ADAM_BETA2), eps=1e-10, weight_decay=0.0,
                             fused=ON_CUDA)
    for opt in (muon, adam):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return muon, adam


def lr_multiplier(progress):
    """Learning-rate schedule by share of the budget spent: warmup, flat, linear warmdown."""
    if progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------


def progress_of(training_s, steps):
    """Share of the budget spent after `steps` steps and `training_s` seconds: of the training
    tokens when the lab sets a token budget (a machine's speed cannot move it), else of the seconds."""
    if lab.budget_tokens:
        return steps * TOTAL_BATCH_SIZE / lab.budget_tokens
    return training_s / lab.budget_s


def budget_text():
    return f"{lab.budget_tokens} tokens" if lab.budget_tokens else f"{lab.budget_s:.0f}s"


def main():
    t_start = time.time()
    torch.manual_seed(lab.seed)
    if ON_CUDA:
        torch.cuda.manual_seed(lab.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if torch.cuda.get_device_capability(DEVICE)[0] >= 9:
            # On Hopper, cuDNN's fused attention is the fastest causal kernel PyTorch ships.
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)

    model = build_model()
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = count_flops_per_token(model)
    muon, adam = build_optimizers(model)
    built_s = time.time() - t_start
    step_model = torch.compile(model) if ON_CUDA and COMPILE else model  # its setup counts as compile time
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ON_CUDA else torch.autocast("cpu", enabled=False)

    rows = min(DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE // SEQ_LEN)  # a smaller total batch shrinks the micro-batch
    assert TOTAL_BATCH_SIZE % (rows * SEQ_LEN) == 0, "TOTAL_BATCH_SIZE must be a multiple of a micro-batch"
    accum_steps = TOTAL_BATCH_SIZE // (rows * SEQ_LEN)
    # Rows one token longer, with their first token (always BOS) dropped: the evaluator's windows
    # start anywhere in the stream, mostly inside a document, so training must not count on BOS at 0.
    batches = iter(lab.train_loader(rows, SEQ_LEN + 1))
    print(f"model: {num_params / 1e6:.1f}M params, depth {DEPTH}, width {MODEL_DIM}, {N_HEAD} heads | "
          f"batch {TOTAL_BATCH_SIZE} tokens ({accum_steps} x {rows} x {SEQ_LEN}) | "
          f"{lab.device}, preset {lab.preset}, budget {budget_text()}, corpus {lab.corpus_hash}", flush=True)

    def train_step(progress, step):
        mult = lr_multiplier(progress)
        for group in adam.param_groups:
            group["lr"] = group["initial_lr"] * mult
        frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
        for group in muon.param_groups:
            group["lr"] = group["initial_lr"] * mult
            group["momentum"] = MUON_MOMENTUM_START + frac * (MUON_MOMENTUM - MUON_MOMENTUM_START)
            group["weight_decay"] = WEIGHT_DECAY * (1 - progress)
        loss_sum = torch.zeros((), device=DEVICE)
        epoch = 0
        for _ in range(accum_steps):
            x, y, epoch = next(batches)
            x, y = x[:, 1:].contiguous(), y[:, 1:].contiguous()
            with autocast:
                loss = step_model(x, y)
            (loss / accum_steps).backward()
            loss_sum += loss.detach()
        muon.step()
        adam.step()
        model.zero_grad(set_to_none=True)
        return loss_sum / accum_steps, epoch  # still on the GPU: reading it waits for the step

    # Warm-up: compile and allocate with one full step, then restore the initial weights and
    # optimizer state, so the budget measures training only and no training happens before it.
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(0.0, 0)
    model.load_state_dict(initial)
    adam.state.clear()
    muon.state.clear()
    del initial
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    gc.freeze()
    startup_s = time.time() - t_start
    print(f"startup {startup_s:.1f}s: model and optimizers {built_s:.1f}s, compile and one warm-up step "
          f"{startup_s - built_s:.1f}s", flush=True)
    lab.ready()  # the lab may have started this run early, while the GPU was busy: wait for the go

    # The GPU runs one step behind the CPU: step k is queued before the loss of step k-1 is read,
    # so the GPU never waits for Python. The clock is read after that wait, and after the last step.
    training_s, step, tokens, smooth, epoch, issued = 0.0, 0, 0, 0.0, 0, 0
    last_print, t_begin, queued = 0.0, time.time(), None
    while queued is not None or progress_of(training_s, issued) < 1.0:
        if progress_of(training_s, issued) < 1.0:
            loss_now, epoch = train_step(progress_of(training_s, issued), issued)
            issued += 1
        else:
            loss_now = None  # the budget is spent: let the last queued step finish
        if queued is not None:
            loss = queued.item()
            training_s = time.time() - t_begin
            if not math.isfinite(loss):
                print(f"step {step:05d} | loss {loss} | training diverged: loss is not finite", flush=True)
                raise SystemExit(1)
            step += 1
            tokens += TOTAL_BATCH_SIZE
            smooth = loss if step == 1 else 0.95 * smooth + 0.05 * loss
            if training_s - last_print >= 5.0 or loss_now is None:
                tok_per_s = TOTAL_BATCH_SIZE * step / training_s
                mfu = 100 * flops_per_token * tok_per_s / PEAK_FLOPS if PEAK_FLOPS else 0.0
                last_print = training_s
                spent = f"{tokens}/{lab.budget_tokens} tokens" if lab.budget_tokens else f"{training_s:.0f}/{lab.budget_s:.0f}s"
                print(f"step {step:05d} | loss {smooth:.4f} | lr x{lr_multiplier(min(progress_of(training_s, step), 1.0)):.2f} | "
                      f"{tok_per_s / 1e6:.2f}M tok/s | mfu {mfu:.1f}% | epoch {epoch} | {spent}", flush=True)
        queued = loss_now

    tok_per_s = tokens / training_s
    summary = {
        "training_seconds": round(training_s, 2),
        "startup_seconds": round(startup_s, 2),
        "total_seconds": round(time.time() - t_start, 2),
        "num_steps": step,
        "total_tokens": tokens,
        "tok_per_s": round(tok_per_s),
        "mfu_percent": round(100 * flops_per_token * tok_per_s / PEAK_FLOPS, 2) if PEAK_FLOPS else 0.0,
        "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if ON_CUDA else 0.0,
        "num_params": num_params,
        "train_loss": round(smooth, 6),
        "depth": DEPTH,
    }
    lab.finish(model, summary)
    print("---")
    for key, value in summary.items():
        print(f"{key}: {value}")


def peak_flops():
    """Dense bf16 peak of the GPU, for MFU; 0 where unknown."""
    if not ON_CUDA:
        return 0.0
    name = torch.cuda.get_device_name(DEVICE)
    for marker, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 362e12), ("4090", 165e12)):
        if marker in name:
            return flops
    return 0.0


PEAK_FLOPS = peak_flops()

if __name__ == "__main__":
    main()
