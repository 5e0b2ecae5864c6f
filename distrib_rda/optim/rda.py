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
per element. See :class:`RDA` for restarts, the hard threshold, and the target sparsity that
sets :math:`\lambda` itself.

As in ``torch.optim``, the :class:`RDA` class keeps the state and :func:`rda` does the step on
lists of tensors, by one of three kernels: per tensor (``_single_tensor*``), multi-tensor
(``_multi_tensor*``, ``torch._foreach_*`` ops) or generated (``_fused*``, ``torch.compile``,
imported and compiled on first use only; the default on CUDA). :func:`rda` computes the
scalars of the step once per bucket of tensors that share them (same device, dtype, ``t`` and
``t0``): the step size and the threshold ``tau``. The kernels take ``tau`` as given and end
by thresholding ``u`` by it, softly or hard. A group with a target sparsity chooses ``tau`` as
a quantile of ``|u|`` in the class, around :func:`rda`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from distrib_rda.optim.schedule import cubic_sparsity, magnitude_quantile

__all__ = ["RDA", "CENTERS", "rda"]

CENTERS = ("init", "zero")
THRESHOLDS = ("soft", "hard")

# Elements per thread processed together by the adaptive per-tensor path, so that the passes
# over one chunk after the first find it in the core's L2 (128Ki float32 = 512 KiB per tensor).
_CHUNK_PER_THREAD = 1 << 17

# On the CPU, foreach=None sends tensors below this size to the multi-tensor kernel (one call
# per op for all of them) and the rest to the per-tensor kernel.
_SMALL = 1 << 14


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


def check_schedule(warmup: Any, power: Any) -> tuple[float, float]:
    warmup = check_nonnegative("warmup", warmup)
    if check_nonnegative("power", power) > 1:
        raise ValueError(f"power must be in [0, 1], got {power!r}")
    return warmup, float(power)


def resolve_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """``foreach=None`` picks what torch's own optimizers pick (multi-tensor on CUDA, not CPU)."""
    if foreach is None:
        if params and params[0].device.type == "cpu":  # torch never defaults to foreach on CPU
            return False
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return bool(foreach)


def resolve_fused(fused: bool | None, foreach: bool | None, device: torch.device) -> bool:
    """``fused=None`` (with ``foreach=None``) picks the generated kernel on CUDA when Triton is
    there, where torch's own optimizers also take their fast path; elsewhere, or when
    ``foreach`` names a path, the eager kernels. On the CPU the compiler would cost every
    process seconds at its first step (benchmarks/optimizer_step.py prints how many)."""
    if fused is not None:
        return fused
    if foreach is not None or device.type != "cuda":
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def chunk_size() -> int:
    return _CHUNK_PER_THREAD * max(1, torch.get_num_threads())


def _flat(t: Tensor) -> Tensor | None:
    """``t``'s elements in memory order as a 1-D view, or ``None`` if they are not dense."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1)
    return None


def chunked(tensors: list[Tensor | None], chunk: int) -> Iterable[tuple[Tensor | None, ...]]:
    """Matching element-wise chunks of same-shaped tensors, the first of which is not ``None``
    (``None`` entries stay ``None``); the whole tensors as one chunk where they are small, not
    on the CPU, or not dense in the same layout."""
    first = tensors[0]
    if first.numel() <= chunk or first.device.type != "cpu":
        return (tensors,)
    strides = first.stride()
    flat = []
    for t in tensors:
        if t is None:
            flat.append(itertools.repeat(None))
            continue
        f = _flat(t) if t.stride() == strides else None
        if f is None:
            return (tensors,)
        flat.append(f.split(chunk))
    return zip(*flat, strict=False)


def soft_threshold_(x: Tensor, tau: float) -> Tensor:
    """In place, ``x <- S_tau(x) = sign(x) * max(|x| - tau, 0)``, one pass."""
    return torch.ops.aten.softshrink.out(x, tau, out=x)


def hard_threshold_(x: Tensor, tau: float) -> Tensor:
    """In place, ``x <- H_tau(x) = x * 1[|x| > tau]``, one pass."""
    return torch.ops.aten.hardshrink.out(x, tau, out=x)


def threshold_(xs: list[Tensor], tau: float, *, hard: bool) -> None:
    """Every tensor of ``xs``, in place, by :func:`hard_threshold_` or :func:`soft_threshold_`."""
    for x in xs:
        (hard_threshold_ if hard else soft_threshold_)(x, tau)


def foreach_soft_threshold_(xs: list[Tensor], tau: float) -> None:
    """In place over a list, ``x <- x - clamp(x, -tau, tau)``: equal to :func:`soft_threshold_`
    bit for bit (``x - tau``, ``x + tau`` or ``x - x = 0``)."""
    clipped = torch._foreach_clamp_min(xs, -tau)
    torch._foreach_clamp_max_(clipped, tau)
    torch._foreach_sub_(xs, clipped)


def _step_dtype() -> torch.dtype:
    """The dtype of the step counts, as in ``torch.optim.Adam``."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _as_step(value: Any) -> Tensor:
    """A step count as a 0-dim CPU tensor (older checkpoints hold Python ints)."""
    if isinstance(value, Tensor):
        if value.device.type == "cpu" and value.dtype.is_floating_point and value.dim() == 0:
            return value
        value = value.item()
    return torch.tensor(float(value), dtype=_step_dtype())


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
    :meth:`add_param_group`), so every parameter has its state from the start. The step count
    ``t`` is a 0-dim float CPU tensor, as in ``torch.optim.Adam``; a state whose count is a
    Python int (checkpoints of earlier versions) is converted when loaded or first used.
    :math:`t_0` stays a Python int: ``Optimizer.load_state_dict`` would cast a tensor to the
    parameter's dtype, and bfloat16 cannot count steps.

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

    **Hard threshold** (``threshold="hard"``): the survivors keep their whole value,
    :math:`w = H_\tau(u) = u\,\mathbb{1}[|u| > \tau]`, the argmin of the same objective with
    :math:`\|w\|_0` in place of :math:`\|w\|_1` and the threshold :math:`\sqrt{2\tau\beta_t}`
    rescaled to :math:`\tau`. The support is chosen as the soft threshold chooses it; only the
    survivors are not shrunk by :math:`\tau`.

    **Target sparsity** (group keys ``target_sparsity`` :math:`s`, ``ramp`` :math:`(t_a, t_b)`
    in steps, ``reselect_every`` :math:`k`): the group's l1 strength is not given but found, so
    that the fraction of its elements at zero follows Zhu & Gupta's cubic ramp
    (:func:`~distrib_rda.optim.schedule.cubic_sparsity`) from 0 at :math:`t_a` to :math:`s` at
    :math:`t_b` and stays there. At every :math:`k`-th step from :math:`t_a`, at :math:`t_b`
    and at every :meth:`project`, the threshold is the :math:`s_t`-quantile of :math:`|u_t|`
    over all the group's tensors together,

    .. math::
        \tau_t = |u_t|_{(\lceil s_t N \rfloor)}, \qquad
        \lambda \leftarrow \lambda_t = \frac{\tau_t\,\beta_t}{t - t_0},

    so exactly :math:`\operatorname{round}(s_t N)` elements are zero; between reselections
    :math:`\tau` stays (``lambda_`` follows, :math:`\lambda_t = \tau\beta_t/(t - t_0)`) and
    only :math:`u_t` moves. This is l1-RDA with the time-varying strength :math:`\lambda_t`;
    the group's ``lambda_`` holds the current one, its ``tau`` the threshold. The survivors
    are the largest :math:`|u_t|`: a weight set to zero keeps adding its gradients to
    :math:`G_t` and comes back as soon as :math:`|u_t|` passes :math:`\tau_t` (regrowth),
    which magnitude pruning, whose pruned weights stay pruned, cannot do. The parameters of a
    target group step together (one :math:`t`); the adaptive :math:`\beta_t` is refused there.

    The step itself is :func:`rda` on the lists of each group.

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
            optimizers do (CUDA); on the CPU it takes the per-tensor path for large tensors and
            the multi-tensor one for small ones. All give the same numbers.
        threshold: ``"soft"`` (:math:`S_\tau`, the l1 prox) or ``"hard"`` (:math:`H_\tau`).
        target_sparsity: per group (``None``: the fixed ``lambda_``), the fraction
            :math:`s \in (0, 1)` of zeros the ramp ends at; with it, ``ramp`` = ``(t_a, t_b)``
            (steps, :math:`0 \le t_a < t_b`) and ``reselect_every`` = :math:`k \ge 1`.
        fused: one generated kernel per tensor (``torch.compile``; Inductor emits C++ on the
            CPU, which needs a C++ compiler, and Triton on CUDA) that reads ``g``, ``G`` and
            :math:`w_1` (and ``Q``) once and writes ``G`` (``Q``) and ``w`` once, like
            ``torch.optim.SGD(fused=True)``. The first step compiles (seconds, cached on disk
            afterwards). ``None`` (the default, with ``foreach=None``): on for CUDA parameters
            when Triton is installed, where torch's own optimizers also default to their fast
            path, off elsewhere. Equal to the other paths up to rounding.

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
        threshold: str = "soft",
        target_sparsity: float | None = None,
        ramp: tuple[int, int] = (0, 1),
        reselect_every: int = 16,
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
            threshold=threshold,
            target_sparsity=target_sparsity,
            ramp=ramp,
            reselect_every=reselect_every,
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
        check_schedule(group.setdefault("warmup", 0.0), group.setdefault("power", 0.5))
        if group.setdefault("threshold", "soft") not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {', '.join(THRESHOLDS)}, got "
                             f"{group['threshold']!r}")
        target = group.setdefault("target_sparsity", None)
        if target is None:
            return
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
            raise ValueError(f"target_sparsity must be a number in (0, 1), got {target!r}")
        start, end = group.setdefault("ramp", (0, 1))
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
            raise ValueError(f"ramp must be (start, end) steps with 0 <= start < end, got "
                             f"{group['ramp']!r}")
        every = group.setdefault("reselect_every", 16)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"reselect_every must be an integer >= 1, got {every!r}")
        if group["adaptive"]:
            raise ValueError("target_sparsity needs the scalar beta_t (a threshold shared by "
                             "the group); adaptive=True gives every element its own")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        for p in group["params"]:
            self._init_state(p, group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for p_state in self.state.values():
            if "step" in p_state:
                p_state["step"] = _as_step(p_state["step"])

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=_step_dtype())
            state["restart_step"] = 0
            state["center"] = p.detach().clone(memory_format=torch.preserve_format)
            state["dual_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["adaptive"] and "sq_sum" not in state:
            state["sq_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _init_group(self, group: dict[str, Any], with_grads: bool) -> dict[str, Any]:
        """The arguments of :func:`rda` for the parameters of ``group`` that step: those with a
        gradient, or with ``with_grads=False`` (a projection) those that have stepped before."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        centers: list[Tensor] = []
        duals: list[Tensor] = []
        sq_sums: list[Tensor] = []
        steps: list[Tensor] = []
        restart_steps: list[int] = []
        adaptive = group["adaptive"]
        for p in group["params"]:
            if with_grads:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise ValueError(
                        "RDA does not support sparse gradients; got a sparse gradient for a "
                        f"parameter of shape {tuple(p.shape)}"
                    )
                grads.append(grad)
            state = self.state[p]
            if not state or (adaptive and "sq_sum" not in state):
                self._init_state(p, group)
            step = state["step"]
            if type(step) is not Tensor:
                step = state["step"] = _as_step(step)
            if not with_grads and not step:
                continue
            params.append(p)
            centers.append(state["center"])
            duals.append(state["dual_sum"])
            if adaptive:
                sq_sums.append(state["sq_sum"])
            steps.append(step)
            restart_steps.append(state["restart_step"])
        return dict(
            params=params,
            grads=grads if with_grads else None,
            centers=centers if group["center"] == "init" else None,
            dual_sums=duals,
            sq_sums=sq_sums if adaptive else None,
            state_steps=steps,
            restart_steps=restart_steps,
            lambda_=group["lambda_"],
            gamma=group["gamma"],
            hard=group["threshold"] == "hard",
            adaptive=adaptive,
            eps=group["eps"],
            warmup=group["warmup"],
            power=group["power"],
            foreach=group["foreach"],
            fused=group["fused"],
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Add each parameter's gradient to its dual sum and set the parameter to the prox."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._check_group(group)
            self._step_group(group, with_grads=True)
        return loss

    @torch.no_grad()
    def project(self) -> None:
        """Set every parameter that has taken a step to the prox of its state, with no new gradient:
        ``w = S_{(t - t0)*lam/beta_t}(w1 - G/beta_t)``; a target group reselects its threshold,
        so it holds exactly its scheduled number of zeros. After the dual tensors were
        all-reduced (:meth:`dual_state_tensors`), this makes the weights of every rank equal."""
        for group in self.param_groups:
            self._check_group(group)
            self._step_group(group, with_grads=False)

    def _step_group(self, group: dict[str, Any], with_grads: bool) -> None:
        args = self._init_group(group, with_grads=with_grads)
        if not args["params"]:
            return
        target = group["target_sparsity"]
        if target is None:
            rda(**args)
            return
        t = args["state_steps"][0].item() + (1 if with_grads else 0)
        t0 = args["restart_steps"][0]
        beta = scalar_beta(group["gamma"], t, group["warmup"], group["power"])
        start, end = group["ramp"]
        if with_grads and not (t >= start and ((t - start) % group["reselect_every"] == 0
                                               or t == end)):
            group["lambda_"] = group.get("tau", 0.0) * beta / (t - t0)  # tau stays
            rda(**{**args, "lambda_": group["lambda_"]})
            return
        rda(**{**args, "lambda_": 0.0})  # the parameters hold u = w1 - G/beta_t
        tau = magnitude_quantile(args["params"], cubic_sparsity(t, start, end, target))
        group["tau"] = tau
        group["lambda_"] = tau * beta / (t - t0) if t > t0 else 0.0
        if tau > 0:
            threshold_(args["params"], tau, hard=args["hard"])

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
                state["restart_step"] = int(state["step"])


@torch.no_grad()
def rda(
    params: list[Tensor],
    grads: list[Tensor] | None,
    centers: list[Tensor] | None,
    dual_sums: list[Tensor],
    sq_sums: list[Tensor] | None,
    state_steps: list[Tensor],
    restart_steps: list[int] | None = None,
    *,
    lambda_: float,
    gamma: float,
    hard: bool = False,
    adaptive: bool = False,
    eps: float = 1e-8,
    warmup: float = 0.0,
    power: float = 0.5,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    r"""Functional RDA: one step on lists of tensors, in place; see :class:`RDA` for the math.

    Per parameter ``i``: ``t = state_steps[i] + 1`` (written back), ``G = dual_sums[i] +
    grads[i]`` (and ``Q = sq_sums[i] + grads[i]**2`` if adaptive), then ``params[i] =
    S_tau(w1 - G/beta_t)`` (``H_tau`` with ``hard=True``) with ``w1 = centers[i]``,
    ``tau = (t - t0) * lambda_ / beta_t`` and ``t0 = restart_steps[i]``.

    Args:
        params: the parameters, overwritten with the prox.
        grads: the gradients; ``None`` for a projection: no new gradient, the step counts and
            the sums stay, the parameters are set to the prox of the state.
        centers: the prox centres :math:`w_1`; ``None`` for the centre 0 (``center="zero"``).
        dual_sums: the gradient sums :math:`G`.
        sq_sums: the squared-gradient sums :math:`Q`, with ``adaptive=True`` only (else ``None``).
        state_steps: the step counts :math:`t`, 0-dim float tensors on the CPU.
        restart_steps: :math:`t_0` per parameter (``None``: all 0).
        hard: the hard threshold ``H_tau(u) = u * 1[|u| > tau]`` instead of ``S_tau``
            (``threshold="hard"`` of :class:`RDA`; with the adaptive ``beta``, per element
            ``H_{tau/beta}``).
        lambda_, gamma, adaptive, eps, warmup, power, foreach, fused: as in :class:`RDA`.
    """
    lambda_ = check_nonnegative("lambda_", lambda_)
    gamma = check_positive("gamma", gamma)
    eps = check_positive("eps", eps)
    warmup, power = check_schedule(warmup, power)
    check_fused(fused, check_foreach(foreach))
    n = len(params)
    lists = {"grads": grads, "centers": centers, "dual_sums": dual_sums, "sq_sums": sq_sums,
             "state_steps": state_steps, "restart_steps": restart_steps}
    for name, values in lists.items():
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} parameters")
    if adaptive != (sq_sums is not None):
        raise ValueError("sq_sums must be given with adaptive=True, and only then")
    if n == 0:
        return
    if restart_steps is None:
        restart_steps = [0] * n

    single = _single_tensor_adaptive if adaptive else _single_tensor
    multi = _multi_tensor_adaptive if adaptive else _multi_tensor
    generated = _fused_adaptive if adaptive else _fused
    tensor_lists = (params, grads, centers, dual_sums, sq_sums)
    for (device, _, t, t0), (tensors, steps) in _buckets(
        tensor_lists, state_steps, restart_steps, advance=grads is not None
    ).items():
        if grads is not None:
            torch._foreach_copy_(steps, [torch.tensor(t, dtype=steps[0].dtype)] * len(steps))
        if adaptive:
            # per element tau/beta_t; the kernels threshold beta*u by the scalar tau instead
            scalars = {"gamma": gamma, "eps": eps, "tau": (t - t0) * lambda_, "hard": hard}
        else:
            beta = scalar_beta(gamma, t, warmup, power)
            scalars = {"alpha": -1.0 / beta, "tau": (t - t0) * lambda_ / beta, "hard": hard}
        if resolve_fused(fused, foreach, device):
            generated(*tensors, **scalars)
        elif foreach is None and device.type == "cpu":
            small, large = _split_by_size(tensors)
            if small is not None:
                multi(*small, **scalars)
            if large is not None:
                single(*large, **scalars)
        elif resolve_foreach(foreach, tensors[0]):
            multi(*tensors, **scalars)
        else:
            single(*tensors, **scalars)


def scalar_beta(gamma: float, t: float, offset: float, power: float) -> float:
    r"""The scalar schedule :math:`\beta_t = \gamma (t + t_w)^p` (``gamma*sqrt(t)`` by default)."""
    if power == 0.5:
        return gamma * math.sqrt(t + offset)
    return gamma * (t + offset) ** power


def _buckets(tensor_lists, state_steps, restart_steps, advance):
    """Group the work by (device, dtype, t, t0), with ``t`` the count after this step: within a
    bucket every scalar is shared. Maps each key to (the tensor lists, their step tensors)."""
    steps = [s.item() + 1 if advance else s.item() for s in state_steps]
    params = tensor_lists[0]
    keys = [(p.device, p.dtype, t, t0) for p, t, t0 in zip(params, steps, restart_steps,
                                                           strict=True)]
    first = keys[0]
    if all(k == first for k in keys):
        return {first: (tensor_lists, state_steps)}
    out: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return {key: (_select(tensor_lists, idx), [state_steps[i] for i in idx])
            for key, idx in out.items()}


def _select(tensor_lists, idx):
    return tuple(None if ts is None else [ts[i] for i in idx] for ts in tensor_lists)


def _split_by_size(tensor_lists):
    """The lists of the tensors below ``_SMALL`` elements and of the others (``None`` if none)."""
    params = tensor_lists[0]
    small = [i for i, p in enumerate(params) if p.numel() < _SMALL]
    if not small:
        return None, tensor_lists
    if len(small) == len(params):
        return tensor_lists, None
    large = [i for i, p in enumerate(params) if p.numel() >= _SMALL]
    return _select(tensor_lists, small), _select(tensor_lists, large)


# Each kernel takes the lists of one bucket, (params, grads, centers, dual_sums, sq_sums) with
# grads None for a projection and centers None for the centre 0, and the bucket's scalars. The
# last stage is the threshold of u = w1 - G/beta by tau (by tau of beta*u, adaptive), soft or
# (scalar schedule) hard.


def _single_tensor(params, grads, centers, dual_sums, sq_sums, *, alpha, tau, hard):
    # Whole tensors, three passes. Chunks of 128Ki-512Ki elements, which keep G and p in cache
    # for the later passes, measured no faster on ResNet-18's parameters.
    for i, p in enumerate(params):
        dual = dual_sums[i]
        if grads is not None:
            dual.add_(grads[i])
        if centers is not None:
            torch.add(centers[i], dual, alpha=alpha, out=p)
        else:
            torch.mul(dual, alpha, out=p)
        if tau > 0:
            (hard_threshold_ if hard else soft_threshold_)(p, tau)


def _multi_tensor(params, grads, centers, dual_sums, sq_sums, *, alpha, tau, hard):
    if grads is not None:
        torch._foreach_add_(dual_sums, grads)
    if centers is not None:
        torch._foreach_copy_(params, centers)
        torch._foreach_add_(params, dual_sums, alpha=alpha)
    else:
        torch._foreach_copy_(params, dual_sums)
        torch._foreach_mul_(params, alpha)
    if tau > 0 and hard:
        threshold_(params, tau, hard=True)  # no multi-tensor hardshrink: one pass per tensor
    elif tau > 0:
        foreach_soft_threshold_(params, tau)


# Adaptive beta is per element, so the threshold (t - t0)*lam/beta is too. The kernels use
#   S_{tau/beta}(w1 - G/beta) = S_tau(beta*w1 - G)/beta = S_tau(G - beta*w1)/(-beta)
# which thresholds by the scalar tau = (t - t0)*lam.


def _single_tensor_adaptive(params, grads, centers, dual_sums, sq_sums, *, gamma, eps, tau,
                            hard):
    chunk = chunk_size()
    for i, param in enumerate(params):
        needs_scratch = centers is not None or tau > 0
        scratch = None
        tensors = [param, None if grads is None else grads[i],
                   None if centers is None else centers[i], dual_sums[i], sq_sums[i]]
        for p, g, w1, dual, sq_sum in chunked(tensors, chunk):
            if g is not None:
                sq_sum.addcmul_(g, g)
                dual.add_(g)
            neg_beta = torch.sqrt(sq_sum, out=p).add_(eps).mul_(-gamma)
            num = dual
            if needs_scratch:
                if not p.is_contiguous():
                    s = torch.empty_like(p)
                else:
                    if scratch is None or p.numel() > scratch.numel():
                        scratch = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
                    s = scratch[: p.numel()].view_as(p)
                if w1 is not None:
                    num = torch.addcmul(dual, w1, neg_beta, out=s)
                if tau > 0:
                    shrink = torch.ops.aten.hardshrink if hard else torch.ops.aten.softshrink
                    num = shrink.out(num, tau, out=s)
            torch.div(num, neg_beta, out=p)


def _multi_tensor_adaptive(params, grads, centers, dual_sums, sq_sums, *, gamma, eps, tau,
                           hard):
    if grads is not None:
        torch._foreach_addcmul_(sq_sums, grads, grads)
        torch._foreach_add_(dual_sums, grads)
    neg_beta = torch._foreach_sqrt(sq_sums)
    torch._foreach_add_(neg_beta, eps)
    torch._foreach_mul_(neg_beta, -gamma)
    if centers is not None:
        num = torch._foreach_addcmul(dual_sums, centers, neg_beta)
    else:
        num = dual_sums
    if tau > 0 and hard:
        if num is dual_sums:
            num = torch._foreach_mul(dual_sums, 1.0)  # a copy: G itself is state
        threshold_(num, tau, hard=True)
    elif tau > 0:
        clipped = torch._foreach_clamp_min(num, -tau)
        torch._foreach_clamp_max_(clipped, tau)
        if num is dual_sums:
            num = torch._foreach_sub(dual_sums, clipped)
        else:
            torch._foreach_sub_(num, clipped)
    if num is dual_sums:
        num = torch._foreach_div(dual_sums, neg_beta)
    else:
        torch._foreach_div_(num, neg_beta)
    torch._foreach_copy_(params, num)


# The fused path: torch.compile turns each loop body into one kernel per tensor, so every
# state tensor is read once and written once. The scalars that change every step go in as
# 0-dim tensors on the parameters' device: Dynamo would specialize on Python floats and
# recompile at every step.


def _fused_kernel(params, grads, centers, dual_sums, alpha, tau, hard):
    for i, (p, dual) in enumerate(zip(params, dual_sums, strict=True)):
        if grads is not None:
            dual.add_(grads[i])
        u = dual * alpha if centers is None else centers[i] + dual * alpha
        p.copy_(torch.where(u.abs() > tau, u, 0.0) if hard else u - u.clamp(-tau, tau))


def _fused_adaptive_kernel(params, grads, centers, dual_sums, sq_sums, gamma, eps, tau, hard):
    for i, (p, dual, sq_sum) in enumerate(zip(params, dual_sums, sq_sums, strict=True)):
        if grads is not None:
            sq_sum.addcmul_(grads[i], grads[i])
            dual.add_(grads[i])
        neg_beta = (sq_sum.sqrt() + eps) * -gamma
        num = dual if centers is None else dual + centers[i] * neg_beta
        kept = torch.where(num.abs() > tau, num, 0.0) if hard else num - num.clamp(-tau, tau)
        p.copy_(kept / neg_beta)


_compiled: dict[Callable, Callable] = {}


def _compile(kernel: Callable) -> Callable:
    """``torch.compile(kernel)``, made on first use: importing it loads Dynamo and Inductor."""
    if kernel not in _compiled:
        _compiled[kernel] = torch.compile(kernel)
    return _compiled[kernel]


def _scalars(like: Tensor, *values: float) -> tuple[Tensor, ...]:
    """``values`` as 0-dim tensors of ``like``'s dtype on its device. Off the CPU they travel
    from pinned memory by a non-blocking copy: ``torch.tensor(v, device="cuda")`` would copy
    from pageable memory and wait for the device at every step."""
    host = torch.tensor(values, dtype=like.dtype)
    if like.device.type != "cpu":
        host = host.pin_memory().to(like.device, non_blocking=True)
    return host.unbind()


def _fused(params, grads, centers, dual_sums, sq_sums, *, alpha, tau, hard):
    _compile(_fused_kernel)(
        [p.detach() for p in params], grads, centers, dual_sums,
        *_scalars(params[0], alpha, tau), hard,
    )


def _fused_adaptive(params, grads, centers, dual_sums, sq_sums, *, gamma, eps, tau, hard):
    _compile(_fused_adaptive_kernel)(
        [p.detach() for p in params], grads, centers, dual_sums, sq_sums,
        gamma, eps, *_scalars(params[0], tau), hard,
    )
