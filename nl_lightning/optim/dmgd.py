# Copyright The nl_lightning developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
r"""
Deep Momentum Gradient Descent
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Momentum is a memory of past gradients; DMGD (Eq. 23-24, NL NeurIPS) makes that memory a small network
:math:`m_\phi` trained by its own inner objective, and moves the weights by what the memory reads out:

.. math::

    \phi \leftarrow \alpha \, \phi - \eta \, \nabla_\phi \mathcal{L}(\phi; K, V), \qquad
    W \leftarrow W + \mathrm{lr} \cdot \sigma\big(m_\phi(K)\big)

The paper gives the inner objective only loosely ("dot-product similarity") and leaves keys, values and the memory's
shape open. Our reading [ours]:

- **Keys and values.** A parameter with ``ndim >= 2`` is viewed as a matrix ``(r, c) = (shape[0], numel // shape[0])``
  (for ``nn.Linear`` the rows are output units, ``c = in_features``). Each gradient row ``g_r`` is one key/value pair:
  the value is ``v_r = -g_r`` and the key is ``k_r = g_r / max(||g_r||, 1e-12)`` (``key="gradient"``) or the constant
  unit key ``1/sqrt(c)`` for every row (``key="constant"``, the sanity-check setting: every row then reads the same
  vector, a momentum of the mean gradient row).
- **Memory.** A residual MLP ``m(z) = M z + W1 act(W2 z)``: ``M (c, c)`` starts at 0, ``W1 (c, h)`` at 0 and
  ``W2 (h, c)`` at ``N(0, 1)`` (unit keys give pre-activations of order 1); ``hidden=0`` keeps only the linear
  memory ``M``. Retention ``alpha`` applies to the memory's contents ``M`` and ``W1``; the key projection ``W2`` is
  trained by the same inner gradient without retention (see the class docstring for why).
- **Objective.** ``"l2"``: ``L = (1/r) sum_r 1/2 ||m(k_r) - v_r||^2`` (the delta rule, Eq. 21-22);
  ``"dot"``: ``L = -(1/r) sum_r <m(k_r), v_r>`` (the Hebbian write of plain momentum). The mean over rows keeps the
  linear part's decay ``alpha I - (eta/r) K^T K`` inside ``[alpha - eta, alpha]`` (unit keys), so the memory contracts
  whenever ``memory_lr <= momentum``.
- **Write, then read.** One inner gradient step per optimizer step, computed in closed form (no autograd), then the
  read ``U = m(K)`` with the current keys, the output nonlinearity ``sigma`` and ``W <- W + lr * U``.

Three sanity checks pin the reading down [ours]. For one row, ``hidden=0``, ``output="none"`` and
``lr=1``, with ``m = M k``:

- ``objective="dot"``, ``key="constant"``: heavy-ball momentum ``m <- alpha m - eta g``, ``W <- W + m`` (Eq. 17-18);
- ``objective="l2"``, ``key="constant"``: the EMA ``m <- (alpha - eta) m - eta g``;
- ``objective="l2"``, ``key="gradient"``: delta momentum ``M <- M (alpha I - eta gh gh^T) - eta g gh^T`` read at
  ``gh = g / ||g||``, the appendix (NL arXiv) version of Eq. 21.

With a linear memory and ``output="newton_schulz"`` DMGD is Muon-like (Eq. 24): ``W <- W + lr NS_T(K M^T)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from nl_lightning._validation import check_choice, check_float, check_int, check_nonnegative, check_unit
from nl_lightning.optim.newton_schulz import newton_schulz

__all__ = ["DMGD"]

_OBJECTIVES = ("l2", "dot")
_KEYS = ("gradient", "constant")
_OUTPUTS = ("none", "tanh", "newton_schulz")
_ACTIVATIONS = ("silu", "tanh", "relu")


def _act(name: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``act(x)`` and its element-wise derivative ``act'(x)``."""
    if name == "silu":
        s = torch.sigmoid(x)
        return x * s, s * (1 + x * (1 - s))
    if name == "tanh":
        t = torch.tanh(x)
        return t, 1 - t * t
    return F.relu(x), (x > 0).to(x.dtype)


def _memory_seed(seed: int, index: int) -> int:
    """The seed of parameter ``index``'s generator: depends on ``seed`` and the index only, never on the global RNG."""
    return (int(seed) * 1_000_003 + index) % 2**32  # the CPU generator keeps only the low 32 bits


def _state_dtype(p: Tensor) -> torch.dtype:
    """Memory state is fp32 for fp32 / half / bfloat16 parameters and fp64 for fp64 parameters."""
    return torch.promote_types(p.dtype, torch.float32)


class DMGD(torch.optim.Optimizer):
    r"""Deep Momentum Gradient Descent: momentum as a small memory trained by its own inner objective.

    Implements Eq. 23-24, NL NeurIPS, in the reading of the module docstring. Per parameter and step, with
    ``alpha = momentum`` and ``eta = memory_lr``:

    1. **Keys, values.** ``G`` is the gradient viewed as ``(r, c)``; ``K`` its unit rows (or the constant unit key),
       ``V = -G``.
    2. **Write.** ``phi <- alpha phi - eta grad_phi L(phi; K, V)`` for ``phi`` in ``{M, W1}`` and
       ``W2 <- W2 - eta grad_W2 L`` (no retention on the key projection), the gradient of the ``"l2"`` or ``"dot"``
       objective in closed form and batched over rows.
    3. **Read.** ``U = sigma(m(K))`` with ``sigma`` = ``output``: identity, element-wise ``tanh``, or Newton-Schulz
       orthogonalization of the ``(r, c)`` matrix (``ns_steps`` quintic iterations in fp32).
    4. **Update.** ``W <- W (1 - lr * weight_decay)`` (decoupled, only if ``weight_decay > 0``), then ``W <- W + lr U``.

    **1-D parameters** (biases, norm weights, and 0-D scalars) get one linear memory per element with a constant key,
    i.e. the momentum buffer ``m <- (alpha - eta) m - eta g`` for ``"l2"`` and ``m <- alpha m - eta g`` for
    ``"dot"``; ``hidden`` and ``key`` do not apply. The read is ``U = m`` and ``sigma`` acts on the ``(1, n)`` view: for
    ``"newton_schulz"`` that is Newton-Schulz of a single row, which is ``m / ||m||`` times the scalar the quintic
    maps 1 to in ``ns_steps`` iterations (the quintic does not converge exactly: 0.696 for the default 5 steps; with
    more steps it settles into a cycle between about 0.68 and 1.14).

    **Choices** [ours]:

    - The memory state is fp32 (fp64 for fp64 parameters), whatever the parameter dtype, also after
      :meth:`load_state_dict` (which torch would otherwise cast to the parameter's dtype).
    - ``W2`` is drawn on the CPU in fp32 from a ``torch.Generator`` seeded with ``(seed * 1_000_003 + index) % 2**32``
      (the CPU generator uses 32 bits of its seed), ``index`` being the parameter's position in the optimizer (over
      all groups, in order), and then moved to the parameter's device. Every DDP rank therefore builds the same
      memory, and the global RNG is neither read nor advanced.
    - ``hidden`` and ``seed`` are read once, when a parameter's memory is created on its first step with a gradient.
      All other hyper-parameters are read from the parameter group at every step, so a schedule may change them;
      ``group["momentum"]`` is ``alpha`` (a momentum rule may scale it). The contraction condition
      ``memory_lr <= momentum`` is checked at construction only.
    - Memory cost per matrix parameter: ``c^2 + 2 h c`` numbers (``M``, ``W1``, ``W2``); compute ``O(r c (c + h))``,
      plus the Newton-Schulz iterations with ``output="newton_schulz"`` (step times: the ``ms/step`` columns of
      ``benchmarks/results/optimizers.md``).
    - **Defaults**: ``output="newton_schulz"``, ``hidden=16``, ``lr=0.02``. Newton-Schulz makes the step scale-free
      (singular values near 1 whatever the gradient's size and the row count), so ``lr`` is the spectral size of each
      change as in Muon, and 0.02 is Muon's usual value. With ``output="none"`` the read's scale depends on the row
      count: for orthogonal gradient rows the linear memory settles at reading ``-eta / (r (1 - alpha) + eta) * g``
      (``0.008 g`` for ``r = 128`` at the defaults), so ``lr`` acts as an SGD rate shrunk by about
      ``r (1 - alpha) / eta``, differently in every layer. ``momentum=0.95`` with ``memory_lr=0.05`` gives the linear
      memory a decay in ``[0.90, 0.95]``.
    - **No retention on ``W2``, initialized at ``N(0, 1)``.** With retention on every tensor the nonlinear branch
      would die out: ``W2`` would shrink as ``alpha^t`` while its gradient, which passes through ``W1`` (initialized
      at 0), is second order, so the branch's read would vanish next to the linear read and ``hidden > 0`` would train
      like ``hidden=0``. Keeping the key projection out of the retention and at the fan-in scale of unit keys keeps
      the branch's read of the order of the linear read.
    - **``hidden=0`` keeps tasks apart.** The nonlinear branch generalises across keys, so a write for the current
      gradients also moves the read of earlier, orthogonal gradient directions; the linear memory does not. Use
      ``hidden=0`` where tasks must stay apart (the orthogonal-task regression of ``benchmarks/optimizers.py``
      compares both: ``benchmarks/results/optimizers.md``).

    Args:
        params: Parameters or parameter groups. A group may override any hyper-parameter below.
        lr: The outer learning rate ``>= 0``.
        momentum: The memory's retention ``alpha`` in ``[0, 1]``.
        memory_lr: The memory's inner learning rate ``eta``, in ``[0, momentum]`` so that the linear memory contracts.
        hidden: Width ``h >= 0`` of the memory's nonlinear branch; 0 keeps only the linear memory ``M``.
        objective: The memory's inner objective, ``"l2"`` (delta rule) or ``"dot"`` (Hebbian).
        key: ``"gradient"`` (unit gradient rows) or ``"constant"`` (``1/sqrt(c)`` for every row).
        output: The output nonlinearity ``sigma``: ``"none"``, ``"tanh"`` or ``"newton_schulz"``.
        activation: The nonlinear branch's activation: ``"silu"``, ``"tanh"`` or ``"relu"``.
        ns_steps: Newton-Schulz iterations ``>= 0`` for ``output="newton_schulz"``.
        weight_decay: Decoupled weight decay ``>= 0``.
        seed: Seeds the initial ``W2`` of every parameter (see above).

    Raises:
        ValueError: If a hyper-parameter is out of range or a string option is unknown (at construction and in
            :meth:`add_param_group`), or at :meth:`step` if a gradient is sparse.

    Example::

        optimizer = DMGD(model.parameters(), lr=0.02, output="newton_schulz")
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    """

    def __init__(
        self,
        params: Union[Iterable[Tensor], Iterable[dict[str, Any]]],
        lr: float = 0.02,
        momentum: float = 0.95,
        memory_lr: float = 0.05,
        hidden: int = 16,
        objective: str = "l2",
        key: str = "gradient",
        output: str = "newton_schulz",
        activation: str = "silu",
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            memory_lr=memory_lr,
            hidden=hidden,
            objective=objective,
            key=key,
            output=output,
            activation=activation,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            seed=seed,
        )
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after validating its hyper-parameters (those it does not set come from the defaults).

        Args:
            param_group: The group, with ``"params"`` and optional hyper-parameter overrides.

        Raises:
            ValueError: If a hyper-parameter of the group is invalid.

        """
        _validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Write every memory once and move every parameter that has a gradient by the memory's read-out.

        Args:
            closure: Optionally re-evaluates the model and returns the loss (run with gradients enabled).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            ValueError: If a gradient is sparse.

        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise ValueError("DMGD does not support sparse gradients; use a dense embedding.")
                    state = self.state[p]
                    if not state:
                        self._init_state(p, state, group, index)
                    _dmgd_update(p, state, group)
                index += 1
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, keeping the memory in its fp32 / fp64 state dtype.

        Args:
            state_dict: A state returned by :meth:`state_dict` (also after ``torch.save`` /
                ``torch.load(weights_only=True)``).

        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, params, strict=True))
        for i, saved in state_dict["state"].items():
            p = id_to_param.get(i)
            if p is None:
                continue
            for k, v in saved.items():  # torch cast these to p.dtype; restore the state dtype from the saved copy
                if k != "step" and isinstance(v, Tensor) and v.is_floating_point():
                    self.state[p][k] = v.to(device=p.device, dtype=_state_dtype(p), copy=True)

    @staticmethod
    def _init_state(p: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> None:
        dtype = _state_dtype(p)
        state["step"] = 0
        if p.ndim < 2:
            state["m"] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
            return
        c, h = p.numel() // p.shape[0], group["hidden"]
        state["M"] = torch.zeros(c, c, dtype=dtype, device=p.device)
        if h > 0:
            gen = torch.Generator().manual_seed(_memory_seed(group["seed"], index))
            w2 = torch.randn(h, c, generator=gen, dtype=torch.float32)  # (h, c) N(0, 1): unit keys, O(1) pre-acts
            state["W1"] = torch.zeros(c, h, dtype=dtype, device=p.device)
            state["W2"] = w2.to(device=p.device, dtype=dtype)


def _read(state: dict[str, Any], k: Tensor, activation: str) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Read ``m(K) = K M^T + act(K W2^T) W1^T``; also return ``act(K W2^T)`` and ``act'(K W2^T)`` for the write."""
    u = k @ state["M"].T  # (r, c)
    if "W1" not in state:
        return u, None, None
    a, da = _act(activation, k @ state["W2"].T)  # (r, h)
    return u + a @ state["W1"].T, a, da


def _dmgd_update(p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Write the memory once, read it, and update ``p``.

    State tensors are replaced, never modified in place, so that a state created under ``torch.inference_mode()`` can
    be stepped outside it and vice versa.
    """
    alpha, eta, lr = group["momentum"], group["memory_lr"], group["lr"]
    l2 = group["objective"] == "l2"
    if p.ndim < 2:  # one linear memory per element with the constant key 1: a momentum buffer
        g = p.grad.reshape(-1).to(state["m"].dtype)  # (n,)
        state["m"] = state["m"] * (alpha - eta if l2 else alpha) - eta * g
        u = state["m"].unsqueeze(0)  # (1, n)
    else:
        r, c = p.shape[0], state["M"].shape[0]
        g = p.grad.reshape(r, c).to(state["M"].dtype)  # (r, c)
        if group["key"] == "gradient":
            k = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (r, c) unit rows
        else:
            k = torch.full_like(g, c**-0.5)  # (r, c) the same unit key for every row
        u, a, da = _read(state, k, group["activation"])
        e = (u + g) / r if l2 else g / r  # (r, c) dL/du row by row, with the value v = -g
        if a is not None:
            dpre = (e @ state["W1"]) * da  # (r, h) dL/d(W2 k)
            state["W1"] = torch.addmm(state["W1"], e.T, a, beta=alpha, alpha=-eta)  # alpha W1 - eta E^T act
            state["W2"] = torch.addmm(state["W2"], dpre.T, k, alpha=-eta)  # W2 - eta dpre^T K (no retention)
        state["M"] = torch.addmm(state["M"], e.T, k, beta=alpha, alpha=-eta)  # alpha M - eta E^T K
        u = _read(state, k, group["activation"])[0]  # (r, c) read after the write, with the current keys
    state["step"] += 1
    if group["output"] == "tanh":
        u = torch.tanh(u)
    elif group["output"] == "newton_schulz":
        u = newton_schulz(u, steps=group["ns_steps"])
    if group["weight_decay"] > 0:
        p.mul_(1 - lr * group["weight_decay"])
    p.add_(u.reshape(p.shape).to(p.dtype), alpha=lr)


def _validate(hp: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the offending value and the fix."""
    check_nonnegative("lr", hp["lr"])
    momentum = check_unit("momentum", hp["momentum"], hint="it is the memory's retention alpha")
    check_float(
        "memory_lr",
        hp["memory_lr"],
        0,
        momentum,
        hint=f"memory_lr <= momentum = {momentum!r} keeps the memory's decay alpha I - eta K^T K / r a contraction;"
        " lower memory_lr or raise momentum",
    )
    check_int("hidden", hp["hidden"], 0, allow_numpy=True, hint="0 keeps only the linear memory")
    check_int("ns_steps", hp["ns_steps"], 0, allow_numpy=True)
    check_int("seed", hp["seed"], None, allow_numpy=True)
    for name, allowed in (
        ("objective", _OBJECTIVES),
        ("key", _KEYS),
        ("output", _OUTPUTS),
        ("activation", _ACTIVATIONS),
    ):
        check_choice(name, hp[name], allowed)
    check_nonnegative("weight_decay", hp["weight_decay"])
