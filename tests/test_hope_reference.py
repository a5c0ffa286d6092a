"""One whole ``HopeBlock`` against a slow, obvious reference: a Python loop over tokens, in float64.

The reference is written from the equations of the module docstrings (``hope.py``, ``self_modifying_titans.py``,
``_residual_memory.py``, ``cms.py``), not from the modules' helpers: it reads the block's parameters by name, computes
every memory's read with the weights of its chunk's anchor, takes every inner gradient by ``torch.autograd.grad`` of a
plainly written loss, and applies every write token by token (self-modifying Titans, Eq. 88) or when its chunk closes
(CMS, Eq. 31 with retention). Per token ``t`` of the block ``x -> y``:

- ``n_t = RMSNorm(x_t)``; the causal depthwise convolution ``c_t = b + sum_j w_j * n_{t-K+1+j}`` (zeros before the
  start); per head ``x^h_t`` (the convolution's channels of head ``h``) and ``q^h_t = normalize(W_q c_t)^h``;
- self-modifying Titans (NL arXiv Eq. 76-93), five residual memories ``M(z) = z + W1 silu(W2 z)`` per head, read at
  their anchor ``A``: ``k = normalize(M_k(x))``, ``v = M_v(x)``, ``eta = eta_max sigmoid(r_eta . M_eta(x) + b_eta)``,
  ``alpha = sigmoid(r_alpha . M_alpha(x) + b_alpha)``, ``o = M_mem(q)``; then for every memory ``L = ||M_A(k) -
  v_hat||^2`` with the target ``v_hat = M_A(v)``, its gradient ``(G1, G2)`` at the anchor clipped to Frobenius norm
  ``max_inner_grad_norm`` (factor ``c``), and ``W1 <- alpha W1 - eta c G1``, ``W2 <- W2 (alpha I - eta k k^T) - eta c
  G2`` (Eq. 88); a memory's running weights become its anchor when its chunk closes (Eq. 90);
- ``r_t = x_t + W_out o_t``;
- every CMS level in turn (NL NeurIPS Eq. 30-31, ``cms.py``): ``k = RMSNorm_i(r)``, ``v = W_value k``, ``r <- r +
  MLP_i(k)`` read with the fast weights ``theta`` (the anchor: they change only at writes), the gradient of
  ``0.5 ||MLP_i(k) - v||^2`` at ``theta`` added to the chunk's sum ``S``; when ``C_i`` tokens are in:
  ``theta <- theta_0 + rho (theta - theta_0) - f (eta_i / C_i) S`` (``theta_0`` the parameters, ``f`` the per-sample
  factor that bounds the step's Frobenius norm over the four weights to ``max_write_norm``);
- ``y_t = r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from nl_lightning.models.hope import HopeBlock

DT = torch.float64
TOL = 1e-8


@dataclass
class Settings:
    """The block's settings that the reference needs, written out (see :func:`default_settings`)."""

    chunk: int  # the k, v, eta, alpha memories' chunk
    mem_chunk: int  # M_mem's chunk
    conv: int  # the convolution's window K
    eta_max: float
    max_grad: Optional[float]  # max_inner_grad_norm
    cms_chunks: tuple[int, ...]
    cms_lrs: tuple[float, ...]
    retention: tuple[float, ...]
    cms_max_write: Optional[float] = 10.0  # the CMS levels' max_write_norm


def default_settings() -> Settings:
    """``HopeBlock(dim, heads)``'s documented defaults: chunk 16, CMS (16, 64, 256) with inner lr ``0.01 * 0.3**i`` and
    retention 0.8; SelfModifyingTitans' conv 4, eta_max 0.5, inner-gradient clip 1, silu memories of width d."""
    return Settings(16, 16, 4, 0.5, 1.0, (16, 64, 256), (0.01, 0.003, 0.0009), (0.8, 0.8, 0.8))


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.nn.RMSNorm`` with ``eps=None``: ``x / sqrt(mean(x^2) + eps) * weight``, ``eps`` the dtype's epsilon."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * weight


def memory(z: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``M(z) = z + W1 silu(W2 z)``: ``z`` ``(..., d)``, ``W1`` ``(..., d, h)``, ``W2`` ``(..., h, d)``."""
    return z + (w1 @ F.silu(w2 @ z.unsqueeze(-1))).squeeze(-1)


def cms_mlp(k: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """``W2 gelu(W1 k + b1) + b2`` per sample: ``k`` ``(B, D)``, ``w1`` ``(B, H, D)``, ``w2`` ``(B, D, H)``."""
    hidden = F.gelu((w["w1"] @ k.unsqueeze(-1)).squeeze(-1) + w["b1"])
    return (w["w2"] @ hidden.unsqueeze(-1)).squeeze(-1) + w["b2"]


class Reference:
    """The block, one token at a time, in float64; the state lives in plain attributes."""

    def __init__(self, block: HopeBlock, s: Settings, batch: int) -> None:
        self.p = {name: t.detach().to(DT) for name, t in block.named_parameters()}
        self.s, self.batch = s, batch
        self.heads = block.mixer.heads
        self.dim = self.p["norm.weight"].shape[0]
        self.d = self.dim // self.heads
        # self-modifying Titans: running weights and anchors, memories first: (5, B, H, d, h) and (5, B, H, h, d)
        w1 = self.p["mixer.w1"].unsqueeze(1).expand(5, batch, *self.p["mixer.w1"].shape[1:]).clone()
        w2 = self.p["mixer.w2"].unsqueeze(1).expand(5, batch, *self.p["mixer.w2"].shape[1:]).clone()
        self.w1, self.w2, self.a1, self.a2 = w1, w2, w1.clone(), w2.clone()
        self.history = [torch.zeros(batch, self.dim, dtype=DT) for _ in range(s.conv - 1)]
        self.clip_factors: list[torch.Tensor] = []
        self.cms_factors: list[torch.Tensor] = []  # the bound's factor of every CMS write
        # CMS: per level the initial weights theta_0, the fast weights theta and the pending gradient sum S
        self.theta0, self.theta, self.pending = [], [], []
        for i in range(len(s.cms_chunks)):
            theta0 = {n: self.p[f"cms.blocks.{i}.{n}"] for n in ("w1", "b1", "w2", "b2")}
            self.theta0.append(theta0)
            self.theta.append({n: t.unsqueeze(0).expand(batch, *t.shape).clone() for n, t in theta0.items()})
            self.pending.append(None)
        self.t = 0

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One token ``x`` ``(B, D)`` through the block; returns ``y`` ``(B, D)``."""
        p, s, b, heads, d = self.p, self.s, self.batch, self.heads, self.d
        # pre-norm and the causal depthwise convolution over the last K normalised inputs
        n = rms_norm(x, p["norm.weight"])
        window = torch.stack([*self.history, n], dim=-1)  # (B, D, K): inputs t-K+1 .. t
        c = p["mixer.conv.bias"] + (p["mixer.conv.weight"][:, 0, :] * window).sum(-1)  # (B, D)
        self.history = [*self.history[1:], n]
        xh = c.view(b, heads, d)
        qh = (c @ p["mixer.q_proj.weight"].T).view(b, heads, d)
        q = qh / qh.norm(dim=-1, keepdim=True)
        # reads at the anchors
        gen = memory(xh, self.a1[:4], self.a2[:4])  # (4, B, H, d): M_k, M_v, M_eta, M_alpha of x
        k = gen[0] / gen[0].norm(dim=-1, keepdim=True)
        v = gen[1]
        readout, bias = p["mixer.readout_weight"], p["mixer.readout_bias"]  # (2, H, d), (2, H): eta, alpha
        eta = s.eta_max * torch.sigmoid((readout[0] * gen[2]).sum(-1) + bias[0])  # (B, H)
        alpha = torch.sigmoid((readout[1] * gen[3]).sum(-1) + bias[1])  # (B, H)
        o = memory(q, self.a1[4], self.a2[4])  # (B, H, d)
        # Eq. 88 for the five memories: the L2 gradient at the anchor (target v_hat = M_A(v) held fixed), clipped
        a1, a2 = self.a1.clone().requires_grad_(), self.a2.clone().requires_grad_()
        with torch.enable_grad():
            v_hat = memory(v, self.a1, self.a2)
            loss = (memory(k, a1, a2) - v_hat).pow(2).sum()  # independent memories, samples and heads: one sum
            g1, g2 = torch.autograd.grad(loss, (a1, a2))
        clip = torch.ones(5, b, heads, dtype=DT)
        if s.max_grad is not None:
            norm = (g1.pow(2).sum((-1, -2)) + g2.pow(2).sum((-1, -2))).sqrt()  # (5, B, H)
            clip = (s.max_grad / norm).clamp(max=1.0)
        self.clip_factors.append(clip)
        e, al = eta[..., None, None], alpha[..., None, None]
        factor = al * torch.eye(d, dtype=DT) - e * k.unsqueeze(-1) * k.unsqueeze(-2)  # (B, H, d, d)
        self.w1 = al * self.w1 - e * clip[..., None, None] * g1
        self.w2 = self.w2 @ factor - e * clip[..., None, None] * g2
        self.t += 1
        if self.t % s.chunk == 0:  # the generators' chunk closes: their anchor moves (Eq. 90)
            self.a1 = torch.cat([self.w1[:4], self.a1[4:]])
            self.a2 = torch.cat([self.w2[:4], self.a2[4:]])
        if self.t % s.mem_chunk == 0:
            self.a1 = torch.cat([self.a1[:4], self.w1[4:]])
            self.a2 = torch.cat([self.a2[:4], self.w2[4:]])
        r = x + o.reshape(b, self.dim) @ p["mixer.out_proj.weight"].T
        # the CMS levels, fastest first
        for i, size in enumerate(s.cms_chunks):
            key = rms_norm(r, p[f"cms.blocks.{i}.norm.weight"])
            value = key @ p[f"cms.blocks.{i}.value"].T
            theta = self.theta[i]
            read = cms_mlp(key, theta)
            leaves = {name: t.clone().requires_grad_() for name, t in theta.items()}
            with torch.enable_grad():
                inner = 0.5 * (cms_mlp(key, leaves) - value).pow(2).sum()  # per-sample weights: one sum
                grads = dict(zip(leaves, torch.autograd.grad(inner, list(leaves.values())), strict=True))
            pend = self.pending[i]
            self.pending[i] = grads if pend is None else {name: pend[name] + grads[name] for name in grads}
            if self.t % size == 0:  # the chunk closes: retention towards theta_0, then the mean gradient step
                rho, lr = s.retention[i], s.cms_lrs[i]
                step = {name: lr / size * g for name, g in self.pending[i].items()}
                f = torch.ones(b, dtype=DT)
                if s.cms_max_write is not None:  # the bound on the step's norm, per sample
                    f = (s.cms_max_write / sum(g.flatten(1).pow(2).sum(1) for g in step.values()).sqrt()).clamp(max=1)
                self.cms_factors.append(f)
                self.theta[i] = {
                    name: self.theta0[i][name]
                    + rho * (w - self.theta0[i][name])
                    - f.view(-1, *[1] * (w.dim() - 1)) * step[name]
                    for name, w in theta.items()
                }
                self.pending[i] = None
            r = r + read
        return r

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.step(x[:, t]) for t in range(x.shape[1])], dim=1)


def make_block(dim: int = 16, heads: int = 2, seed: int = 0, **kwargs) -> HopeBlock:
    """A float64 block whose parameters are all off their initial values (norm gains 1, value projections I, the
    readout biases at ``logit(eta_init / eta_max)`` and ``logit(alpha_init)``), so that every one of them matters."""
    torch.manual_seed(seed)
    block = HopeBlock(dim, heads, **kwargs).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in block.named_parameters():
            if name.endswith("norm.weight"):
                t.add_(0.2 * torch.randn(t.shape, generator=gen, dtype=DT))
            elif name.endswith("value"):
                t.add_(0.3 * torch.randn(t.shape, generator=gen, dtype=DT) / dim**0.5)
            elif name == "mixer.readout_bias":
                t.add_(torch.randn(t.shape, generator=gen, dtype=DT))
    return block


def compare_state(state, ref: Reference, s: Settings, seq: int) -> dict[str, float]:
    """Assert the block's returned state equals the reference's; return the max differences."""
    diffs = {}

    def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        assert got.dtype == DT, name
        diffs[name] = float((got - want).abs().max())
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL, msg=lambda m: f"{name}: {m}")

    titans = state.titans
    check("titans.w1", titans.w1, ref.w1.transpose(0, 1))  # the state keeps (B, 5, H, ., .)
    check("titans.w2", titans.w2, ref.w2.transpose(0, 1))
    check("titans.anchor_w1", titans.anchor_w1, ref.a1.transpose(0, 1))
    check("titans.anchor_w2", titans.anchor_w2, ref.a2.transpose(0, 1))
    check("titans.conv", titans.conv, torch.stack(ref.history, dim=1))
    assert (titans.count, titans.mem_count) == (seq % s.chunk, seq % s.mem_chunk)
    for i, (fast, size) in enumerate(zip(state.cms.levels, s.cms_chunks, strict=True)):
        assert fast.count == seq % size
        for name, got in zip(("w1", "b1", "w2", "b2"), fast.weights, strict=True):
            check(f"cms{i}.{name}", got, ref.theta[i][name])
        if ref.pending[i] is None:
            assert fast.pending is None
        else:
            for name, got in zip(("w1", "b1", "w2", "b2"), fast.pending, strict=True):
                check(f"cms{i}.pending.{name}", got, ref.pending[i][name])
    return diffs


def test_hope_block_at_its_defaults_matches_the_token_by_token_reference():
    """``HopeBlock(16, 2)`` at its defaults over 300 tokens: 18 full chunks of the Titans memories and of CMS level 0
    and a partial one, 4 writes of level 1 and a partial chunk, 1 write of level 2 and a partial chunk."""
    batch, seq = 2, 300
    block = make_block()
    s = default_settings()
    # the settings written out above are the block's
    mixer, levels = block.mixer, block.cms.blocks
    assert (mixer.chunk_size, mixer.mem_chunk_size, mixer.conv_size, mixer.eta_max) == (s.chunk, s.mem_chunk, 4, 0.5)
    assert (mixer.max_inner_grad_norm, mixer.rule, mixer.activation, mixer.hidden) == (1.0, "paper", "silu", 8)
    assert tuple(lvl.chunk_size for lvl in levels) == s.cms_chunks
    assert [lvl.inner_lr for lvl in levels] == pytest.approx(s.cms_lrs)
    assert tuple(lvl.retention for lvl in levels) == s.retention
    assert all(lvl.max_write_norm == s.cms_max_write for lvl in levels)
    for lvl in levels:
        assert (lvl.activation, lvl.hidden, lvl.reduction, lvl.residual) == ("gelu", 32, "mean", True)
    assert not block.cms.differentiable_writes

    x = torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(2), dtype=DT)
    with torch.no_grad():
        y, state = block(x)
    ref = Reference(block, s, batch)
    want = ref.run(x)
    clip = torch.stack(ref.clip_factors)
    assert (clip < 1).any() and (clip == 1).any()  # the inner-gradient clip is active on some tokens, not all
    assert y.dtype == DT
    torch.testing.assert_close(y, want, atol=TOL, rtol=TOL)
    compare_state(state, ref, s, seq)


def test_hope_block_with_small_chunks_matches_the_reference_and_carries_its_state():
    """Many writes: Titans chunks of 4 with ``M_mem`` on its own chunk of 3 (the separate memory pass), CMS chunks
    (2, 5, 12) with a retention per level and larger inner rates, a tighter clip and a bound on the CMS writes that
    some of them reach; the stream cut mid-chunk into two calls that carry the state."""
    batch, seq, cut = 2, 61, 23
    kwargs = dict(
        chunk_size=4,
        cms_chunk_sizes=(2, 5, 12),
        cms_inner_lr=(0.1, 0.06, 0.03),
        titans_kwargs={"mem_chunk_size": 3, "max_inner_grad_norm": 0.5},
        cms_retention=(0.9, 0.7, 0.5),
        cms_max_write_norm=0.3,
    )
    block = make_block(seed=3, **kwargs)
    s = Settings(4, 3, 4, 0.5, 0.5, (2, 5, 12), (0.1, 0.06, 0.03), (0.9, 0.7, 0.5), cms_max_write=0.3)
    x = torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(4), dtype=DT)
    with torch.no_grad():
        y1, state = block(x[:, :cut])
        y2, state = block(x[:, cut:], state)
    ref = Reference(block, s, batch)
    want = ref.run(x)
    clip = torch.stack(ref.clip_factors)
    assert (clip < 1).any() and (clip == 1).any()
    bound = torch.cat(ref.cms_factors)
    assert (bound < 1).any() and (bound == 1).any()  # the CMS write bound is active on some writes, not all
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), want, atol=TOL, rtol=TOL)
    compare_state(state, ref, s, seq)
