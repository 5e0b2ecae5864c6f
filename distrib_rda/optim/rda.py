r"""Regularized dual averaging with an l1 term (RDA), DESIGN.md section 2.

For each parameter tensor, element-wise, with :math:`w_1` the value the optimizer first saw:

.. math::
    G_t = \sum_{\tau \le t} g_\tau, \qquad
    w_{t+1} = \operatorname*{argmin}_w \langle G_t, w\rangle + t\lambda\|w\|_1
              + \tfrac{\beta_t}{2}\|w - w_1\|^2
            = S_{t\lambda/\beta_t}\!\left(w_1 - G_t/\beta_t\right),

with :math:`S_\tau(u) = \operatorname{sign}(u)\max(|u| - \tau, 0)` and either
:math:`\beta_t = \gamma\sqrt{t}` (generalized to :math:`\gamma(t + t_w)^p`) or, with
``adaptive=True``, :math:`\beta_t = \gamma(\sqrt{\textstyle\sum_{\tau \le t} g_\tau^2} + \epsilon)`
per element. See :class:`RDA` for restarts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

__all__ = ["RDA", "CENTERS"]

CENTERS = ("init", "zero")

# Elements per thread processed together by the per-tensor path, so that the few passes over
# one chunk stay in the core's L2 cache (128Ki float32 = 512 KiB per tensor).
_CHUNK_PER_THREAD = 1 << 17


def check_nonnegative(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_foreach(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"foreach must be None, True or False, got {value!r}")
    return value


def check_fused(value: Any, foreach: bool | None) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"fused must be None, True or False, got {value!r}")
    if value and foreach:
        raise ValueError("fused and foreach cannot both be True; choose one path")
    return value


def resolve_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """``foreach=None`` picks what torch's own optimizers pick (multi-tensor on CUDA, not CPU)."""
    if foreach is None:
        if params and params[0].device.type == "cpu":  # torch never defaults to foreach on CPU
            return False
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return bool(foreach)


def chunk_size() -> int:
    return _CHUNK_PER_THREAD * max(1, torch.get_num_threads())


def chunked(tensors: list[Tensor | None], chunk: int) -> Iterable[tuple[Tensor | None, ...]]:
    """Matching element-wise chunks of same-shaped tensors, the first of which is not ``None``
    (``None`` entries stay ``None``); the whole tensors as one chunk where they are small, not
    contiguous or not on the CPU."""
    first = tensors[0]
    if (
        first.numel() <= chunk
        or first.device.type != "cpu"
        or not all(t.is_contiguous() for t in tensors if t is not None)
    ):
        return (tensors,)
    return zip(
        *(t.view(-1).split(chunk) if t is not None else itertools.repeat(None) for t in tensors),
        strict=False,
    )


def soft_threshold_(x: Tensor, tau: float) -> Tensor:
    """In place, ``x <- S_tau(x) = sign(x) * max(|x| - tau, 0)``, one pass."""
    return torch._C._nn.softshrink(x, tau, out=x)


def foreach_soft_threshold_(xs: list[Tensor], tau: float) -> None:
    """In place over a list, ``x <- x - clamp(x, -tau, tau)``: equal to :func:`soft_threshold_`
    bit for bit (``x - tau``, ``x + tau`` or ``x - x = 0``)."""
    clipped = torch._foreach_clamp_min(xs, -tau)
    torch._foreach_clamp_max_(clipped, tau)
    torch._foreach_sub_(xs, clipped)


class RDA(Optimizer):
    r"""l1-regularized dual averaging (Xiao 2010; He et al. 2020 for CNNs), DESIGN.md section 2.

    .. math::
       \begin{aligned}
         &\textbf{state per parameter: } w_1 \text{ (``center''; } 0 \text{ if center=``zero''}),
             \; G_0 = 0 \text{ (``dual\_sum''}), \; t = 0 \text{ (``step''}),
             \; t_0 = 0 \text{ (``restart\_step''}), \; Q_0 = 0 \text{ (``sq\_sum''}) \\
         &\textbf{for each step with gradient } g: \\
         &\quad t \leftarrow t + 1, \quad G_t = G_{t-1} + g \\
         &\quad \textbf{if } \text{adaptive}: Q_t = Q_{t-1} + g^2, \;
             \beta_t = \gamma(\sqrt{Q_t} + \epsilon) \\
         &\quad \textbf{else}: \beta_t = \gamma\,(t + t_w)^p
             \quad (\gamma\sqrt{t} \text{ with the defaults } t_w = 0,\ p = 1/2) \\
         &\quad w \leftarrow S_{(t - t_0)\lambda/\beta_t}\bigl(w_1 - G_t/\beta_t\bigr),
             \qquad S_\tau(u) = \operatorname{sign}(u)\max(|u| - \tau, 0)
       \end{aligned}

    which is :math:`\operatorname{argmin}_w \langle G_t, w\rangle + (t - t_0)\lambda\|w\|_1
    + \frac{\beta_t}{2}\|w - w_1\|^2`. Without restarts :math:`t_0 = 0`, the formula of
    DESIGN.md. Groups with :math:`\lambda = 0` do plain dual averaging, :math:`w_1 - G_t/\beta_t`.
    With ``center="zero"`` :math:`w_1` is 0 in the formula (Xiao's original). :math:`\gamma`
    acts as an inverse learning rate: the step on the gradient sum is :math:`1/\beta_t`.

    :math:`w_1` is taken when the parameter is added to the optimizer (construction or
    :meth:`add_param_group`), so every parameter has its state from the start.

    **Warm-up** (``warmup`` :math:`= t_w \ge 0`, scalar schedule): :math:`\beta_t = \gamma
    \sqrt{t + t_w}` is the schedule of a run that had already taken :math:`t_w` steps with zero
    gradient. Plain :math:`\gamma\sqrt{t}` moves the first step by :math:`g_1/\gamma` (3.3
    :math:`g_1` at :math:`\gamma = 0.3`) and the next ones by nearly as much, which blows up
    small CNNs within a few dozen steps; with :math:`t_w` the step on the gradient sum is at
    most :math:`1/(\gamma\sqrt{1 + t_w})`, while for :math:`t \gg t_w` the schedule, and the
    :math:`O(\sqrt{t})` regret bound of dual averaging, are unchanged. The threshold is
    :math:`(t - t_0)\lambda/\beta_t`, so the l1 pressure ramps up with the same delay.

    **Power** (``power`` :math:`= p \in [0, 1]`, scalar schedule): :math:`\beta_t = \gamma
    (t + t_w)^p`. :math:`p = 1/2` is Xiao's rate; a smaller :math:`p` decays the step more
    slowly and raises the threshold :math:`\lambda t^{1-p}/\gamma` faster.

    **Restart** (:meth:`restart`, at step :math:`t_r`): :math:`w_1 \leftarrow w_{t_r+1}`,
    :math:`G \leftarrow 0`, :math:`t_0 \leftarrow t_r`, while :math:`t` and :math:`Q` go on.
    After it, for :math:`t > t_r`,

    .. math::
       w_{t+1} = S_{(t - t_r)\lambda/\beta_t}\Bigl(w_{t_r+1} - \sum_{t_r < \tau \le t} g_\tau
       \big/ \beta_t\Bigr),

    so :math:`\beta` stays on the global clock (the first step after a restart moves the
    weights by :math:`g/\beta_{t_r+1}`, as large as the step before it, not by :math:`g/\gamma`
    as a naive :math:`t \leftarrow 0` would), and the l1 weight is counted from the restart
    (the threshold starts again at :math:`\lambda/\beta_t` instead of zeroing every weight
    below :math:`t\lambda/\beta_t` at once).

    Args:
        params: parameters or parameter groups (dicts); every keyword below can be set per group.
        lambda_: l1 strength :math:`\lambda \ge 0`.
        gamma: :math:`\gamma > 0`, the scale of :math:`\beta_t`.
        warmup: :math:`t_w \ge 0` in the scalar :math:`\beta_t` (steps); the adaptive
            :math:`\beta_t` does not use it.
        power: :math:`p \in [0, 1]` in the scalar :math:`\beta_t`; the adaptive
            :math:`\beta_t` does not use it.
        adaptive: diagonal AdaGrad :math:`\beta_t` instead of :math:`\gamma\sqrt{t}`.
        eps: :math:`\epsilon > 0` in the adaptive :math:`\beta_t`.
        center: ``"init"`` (prox centre :math:`w_1`) or ``"zero"``.
        foreach: multi-tensor ``torch._foreach_*`` path; ``None`` picks it where torch's own
            optimizers do (CUDA), else the per-tensor path. Both give the same numbers.
        fused: one generated kernel per tensor (``torch.compile``; Inductor emits C++ on the
            CPU, which needs a C++ compiler, and Triton on CUDA) that reads ``g``, ``G`` and
            :math:`w_1` (and ``Q``) once and writes ``G`` (``Q``) and ``w`` once, like
            ``torch.optim.SGD(fused=True)``. The first step compiles (seconds, cached on disk
            afterwards). Off by default, as in torch; equal to the other paths up to rounding.

    Sparse gradients are refused (``ValueError``) at step time.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lambda_: float = 0.0,
        gamma: float = 1.0,
        adaptive: bool = False,
        eps: float = 1e-8,
        center: str = "init",
        foreach: bool | None = None,
        warmup: float = 0.0,
        power: float = 0.5,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lambda_=lambda_,
            gamma=gamma,
            adaptive=adaptive,
            eps=eps,
            center=center,
            foreach=foreach,
            warmup=warmup,
            power=power,
            fused=fused,
        )
        self._check_group(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_nonnegative("lambda_", group["lambda_"])
        check_positive("gamma", group["gamma"])
        check_positive("eps", group["eps"])
        if not isinstance(group["adaptive"], bool):
            raise ValueError(f"adaptive must be True or False, got {group['adaptive']!r}")
        if group["center"] not in CENTERS:
            raise ValueError(f"center must be one of {', '.join(CENTERS)}, got {group['center']!r}")
        check_foreach(group["foreach"])
        check_fused(group.setdefault("fused", None), group["foreach"])
        check_nonnegative("warmup", group.setdefault("warmup", 0.0))
        if check_nonnegative("power", group.setdefault("power", 0.5)) > 1:
            raise ValueError(f"power must be in [0, 1], got {group['power']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        for p in group["params"]:
            self._init_state(p, group)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["restart_step"] = 0
            state["center"] = p.detach().clone(memory_format=torch.preserve_format)
            state["dual_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["adaptive"] and "sq_sum" not in state:
            state["sq_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _gather(self, group: dict[str, Any], with_grads: bool):
        params: list[Tensor] = []
        grads: list[Tensor] = []
        states: list[dict[str, Any]] = []
        for p in group["params"]:
            if with_grads:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(
                        "RDA does not support sparse gradients; got a sparse gradient for a "
                        f"parameter of shape {tuple(p.shape)}"
                    )
                grads.append(p.grad)
            state = self._init_state(p, group)
            if not with_grads and state["step"] == 0:
                continue
            params.append(p)
            states.append(state)
        return params, grads, states

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Add each parameter's gradient to its dual sum and set the parameter to the prox."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._check_group(group)
            params, grads, states = self._gather(group, with_grads=True)
            if not params:
                continue
            for state in states:
                state["step"] += 1
            self._update(group, params, grads, states)
        return loss

    @torch.no_grad()
    def project(self) -> None:
        """Set every parameter that has taken a step to the prox of its state, with no new gradient:
        ``w = S_{(t - t0)*lam/beta_t}(w1 - G/beta_t)``. After the dual tensors were all-reduced
        (:meth:`dual_state_tensors`), this makes the weights of every rank equal."""
        for group in self.param_groups:
            self._check_group(group)
            params, _, states = self._gather(group, with_grads=False)
            if params:
                self._update(group, params, None, states)

    def dual_state_tensors(self) -> list[Tensor]:
        """The state tensors to all-reduce with AVG at a local-dual-averaging sync, in place.

        Per group, per parameter in order: ``dual_sum``, then ``sq_sum`` when the group is
        adaptive. These are the state tensors themselves, not copies."""
        out: list[Tensor] = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self._init_state(p, group)
                out.append(state["dual_sum"])
                if group["adaptive"]:
                    out.append(state["sq_sum"])
        return out

    @torch.no_grad()
    def restart(self) -> None:
        """Re-centre at the current weights: ``w1 <- w``, ``G <- 0``, ``t0 <- t`` (see the class
        docstring); ``t`` and the squared-gradient sums go on, so the step stays continuous.

        Refused (``ValueError``) for groups with ``center="zero"``, whose prox centre is 0."""
        for group in self.param_groups:
            if group["center"] != "init":
                raise ValueError(
                    "restart() re-centres the prox at the current weights and needs "
                    f"center='init'; a parameter group has center={group['center']!r}"
                )
        for group in self.param_groups:
            for p in group["params"]:
                state = self._init_state(p, group)
                state["center"].copy_(p.detach())
                state["dual_sum"].zero_()
                state["restart_step"] = state["step"]

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor] | None,
        states: list[dict[str, Any]],
    ) -> None:
        foreach = resolve_foreach(group["foreach"], params)
        schedule = {}
        if group["fused"]:
            fn = _fused_adaptive if group["adaptive"] else _fused_scalar
        elif group["adaptive"]:
            fn = _multi_tensor_adaptive if foreach else _single_tensor_adaptive
        else:
            fn = _multi_tensor_scalar if foreach else _single_tensor_scalar
        if not group["adaptive"]:
            schedule = {"offset": float(group["warmup"]), "power": float(group["power"])}
        fn(
            params,
            grads,
            states,
            lam=float(group["lambda_"]),
            gamma=float(group["gamma"]),
            eps=float(group["eps"]),
            from_init=group["center"] == "init",
            **schedule,
        )


def scalar_beta(gamma: float, t: int, offset: float, power: float) -> float:
    r"""The scalar schedule :math:`\beta_t = \gamma (t + t_w)^p` (``gamma*sqrt(t)`` by default)."""
    if power == 0.5:
        return gamma * math.sqrt(t + offset)
    return gamma * (t + offset) ** power


def _buckets(params, grads, states):
    """Group the work by (device, dtype, t, t0): within a bucket every scalar is shared."""
    out: dict[tuple, tuple[list, list, list]] = {}
    for i, (p, state) in enumerate(zip(params, states, strict=True)):
        key = (p.device, p.dtype, state["step"], state["restart_step"])
        ps, gs, ss = out.setdefault(key, ([], [], []))
        ps.append(p)
        gs.append(grads[i] if grads is not None else None)
        ss.append(state)
    return out


def _single_tensor_scalar(
    params, grads, states, *, lam, gamma, eps, from_init, offset=0.0, power=0.5
):
    # Three passes per tensor: G += g; w = w1 - G/beta; w = S_tau(w) in place.
    for i, (p, state) in enumerate(zip(params, states, strict=True)):
        t = state["step"]
        beta = scalar_beta(gamma, t, offset, power)
        tau = (t - state["restart_step"]) * lam / beta
        weight, dual = p.detach(), state["dual_sum"]
        if grads is not None:
            dual.add_(grads[i])
        if from_init:
            torch.add(state["center"], dual, alpha=-1.0 / beta, out=weight)
        else:
            torch.mul(dual, -1.0 / beta, out=weight)
        if tau > 0:
            soft_threshold_(weight, tau)


def _multi_tensor_scalar(
    params, grads, states, *, lam, gamma, eps, from_init, offset=0.0, power=0.5
):
    for (_, _, t, t0), (ps, gs, ss) in _buckets(params, grads, states).items():
        beta = scalar_beta(gamma, t, offset, power)
        alpha = -1.0 / beta
        tau = (t - t0) * lam / beta
        duals = [s["dual_sum"] for s in ss]
        if grads is not None:
            torch._foreach_add_(duals, gs)
        if from_init:
            torch._foreach_copy_(ps, [s["center"] for s in ss])
            torch._foreach_add_(ps, duals, alpha=alpha)
        else:
            torch._foreach_copy_(ps, duals)
            torch._foreach_mul_(ps, alpha)
        if tau > 0:
            foreach_soft_threshold_(ps, tau)


# Adaptive beta is per element, so the threshold t*lam/beta is too. Both paths use
#   S_{tau/beta}(w1 - G/beta) = S_tau(beta*w1 - G)/beta = S_tau(G - beta*w1)/(-beta)
# which thresholds by the scalar tau = (t - t0)*lam.


def _single_tensor_adaptive(params, grads, states, *, lam, gamma, eps, from_init):
    chunk = chunk_size()
    for i, (p, state) in enumerate(zip(params, states, strict=True)):
        tau = (state["step"] - state["restart_step"]) * lam
        g = grads[i] if grads is not None else None
        needs_scratch = from_init or tau > 0
        scratch = None
        tensors = [p.detach(), g, state["center"], state["dual_sum"], state["sq_sum"]]
        for pc, gc, wc, dc, qc in chunked(tensors, chunk):
            if gc is not None:
                qc.addcmul_(gc, gc)
                dc.add_(gc)
            neg_beta = torch.sqrt(qc, out=pc).add_(eps).mul_(-gamma)
            num = dc
            if needs_scratch:
                if not pc.is_contiguous():
                    sc = torch.empty_like(pc)
                else:
                    if scratch is None or pc.numel() > scratch.numel():
                        scratch = torch.empty(pc.numel(), dtype=pc.dtype, device=pc.device)
                    sc = scratch[: pc.numel()].view_as(pc)
                if from_init:
                    num = torch.addcmul(dc, wc, neg_beta, out=sc)
                if tau > 0:
                    num = torch._C._nn.softshrink(num, tau, out=sc)
            torch.div(num, neg_beta, out=pc)


def _multi_tensor_adaptive(params, grads, states, *, lam, gamma, eps, from_init):
    for (_, _, t, t0), (ps, gs, ss) in _buckets(params, grads, states).items():
        tau = (t - t0) * lam
        duals = [s["dual_sum"] for s in ss]
        if grads is not None:
            torch._foreach_addcmul_([s["sq_sum"] for s in ss], gs, gs)
            torch._foreach_add_(duals, gs)
        neg_beta = torch._foreach_sqrt([s["sq_sum"] for s in ss])
        torch._foreach_add_(neg_beta, eps)
        torch._foreach_mul_(neg_beta, -gamma)
        if from_init:
            num = torch._foreach_addcmul(duals, [s["center"] for s in ss], neg_beta)
        else:
            num = duals
        if tau > 0:
            clipped = torch._foreach_clamp_min(num, -tau)
            torch._foreach_clamp_max_(clipped, tau)
            if num is duals:
                num = torch._foreach_sub(duals, clipped)
            else:
                torch._foreach_sub_(num, clipped)
        if num is duals:
            num = torch._foreach_div(duals, neg_beta)
        else:
            torch._foreach_div_(num, neg_beta)
        torch._foreach_copy_(ps, num)


# The fused path: torch.compile turns each loop body into one kernel per tensor, so every
# state tensor is read once and written once. The scalars that change every step go in as
# 0-dim tensors: Dynamo would specialize on Python floats and recompile at every step.


def _fused_scalar_kernel(params, grads, centers, duals, alpha, tau, from_init):
    for i, (p, center, dual) in enumerate(zip(params, centers, duals, strict=True)):
        if grads is not None:
            dual.add_(grads[i])
        u = center + dual * alpha if from_init else dual * alpha
        p.copy_(u - u.clamp(-tau, tau))


def _fused_adaptive_kernel(params, grads, centers, duals, sq_sums, gamma, eps, tau, from_init):
    for i, (p, center, dual, sq_sum) in enumerate(
        zip(params, centers, duals, sq_sums, strict=True)
    ):
        if grads is not None:
            sq_sum.addcmul_(grads[i], grads[i])
            dual.add_(grads[i])
        neg_beta = (sq_sum.sqrt() + eps) * -gamma
        num = dual + center * neg_beta if from_init else dual
        p.copy_((num - num.clamp(-tau, tau)) / neg_beta)


_compiled_scalar = torch.compile(_fused_scalar_kernel)
_compiled_adaptive = torch.compile(_fused_adaptive_kernel)


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _fused_scalar(params, grads, states, *, lam, gamma, eps, from_init, offset=0.0, power=0.5):
    for (_, _, t, t0), (ps, gs, ss) in _buckets(params, grads, states).items():
        beta = scalar_beta(gamma, t, offset, power)
        _compiled_scalar(
            [p.detach() for p in ps], gs if grads is not None else None,
            [s["center"] for s in ss], [s["dual_sum"] for s in ss],
            _scalar(-1.0 / beta, ps[0]), _scalar((t - t0) * lam / beta, ps[0]), from_init,
        )


def _fused_adaptive(params, grads, states, *, lam, gamma, eps, from_init):
    for (_, _, t, t0), (ps, gs, ss) in _buckets(params, grads, states).items():
        _compiled_adaptive(
            [p.detach() for p in ps], gs if grads is not None else None,
            [s["center"] for s in ss], [s["dual_sum"] for s in ss], [s["sq_sum"] for s in ss],
            gamma, eps, _scalar((t - t0) * lam, ps[0]), from_init,
        )
