"""The optimizers a run can use, each with the hyperparameters that belong to it.

:data:`OPTIMIZERS` maps a name to a settings class: the keys of that optimizer (``lambda_`` for
RDA and proximal SGD, ``target_sparsity`` for RDA and GMP, ``lr`` for the SGD family) with their
defaults, ranges and descriptions, and :meth:`~OptimizerSettings.build`, which makes the
optimizer, its schedule and its pruner for a model. A run's config holds the settings of its one
optimizer (``TrainConfig.optim``), so a run records only what applies to it. Adding a baseline
is one class here.

Importing this module is cheap; torch is imported when an optimizer is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)

from distrib_rda.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from distrib_rda.optim.parts import OptimizerParts


def _number(value: Any) -> Any:
    """Numbers as YAML, JSON and flags give them: no booleans; ``"1e-5"`` (YAML 1.1 reads it as
    a string) is the number 1e-5."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError("must be a number") from None
    return value


def _integer(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not true/false")
    return value


Number = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]
Integer = Annotated[int, BeforeValidator(_integer)]
Switch = Annotated[bool, Strict()]

OPTIMIZERS: Registry[type[OptimizerSettings]] = Registry("optimizer")


class OptimizerSettings(BaseModel):
    """The hyperparameters of one optimizer; subclasses are registered in :data:`OPTIMIZERS`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    #: whether ``sync_every > 1`` (local dual averaging) applies
    dual_averaging: ClassVar[bool] = False
    #: the keys that set how sparse a run gets, in order of precedence
    knobs: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def knob(cls, params: dict[str, Any]) -> tuple[str, float] | None:
        """The key that drives a run's sparsity and its value, read from its (MLflow) params:
        ``("lambda_", 1e-3)``, ``("target_sparsity", 0.95)``, or ``None`` for a dense run."""
        for key in cls.knobs:
            try:
                return key, float(params[key])
            except (KeyError, TypeError, ValueError):  # absent, or "None"
                continue
        return None

    def build(self, model: nn.Module, total_steps: int) -> OptimizerParts:
        raise NotImplementedError


class _Momentum(OptimizerSettings):
    lr: Number = Field(0.05, gt=0, description="peak learning rate (cosine decay to 0)")
    momentum: Number = Field(0.9, ge=0, lt=1, description="heavy-ball momentum")

    def _sgd(self, params: Any, total_steps: int):
        import torch

        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


Ramp = Annotated[tuple[Number, Number], Field(description=(
    "the sparsity ramps (cubic, Zhu & Gupta) from 0 at the first fraction of the steps to "
    "the target at the second"))]


def _check_ramp(ramp: tuple[float, float]) -> tuple[float, float]:
    start, end = ramp
    if not 0 <= start < end <= 1:
        raise ValueError("must be [start, end] fractions of the steps with "
                         "0 <= start < end <= 1")
    return ramp


@OPTIMIZERS.register("sgd", "dense SGD with momentum and cosine decay: the accuracy reference")
class SGD(_Momentum):
    """Dense SGD with heavy-ball momentum, the learning rate decayed to 0 by a cosine."""

    def build(self, model: nn.Module, total_steps: int) -> OptimizerParts:
        from distrib_rda.optim.parts import OptimizerParts

        return OptimizerParts(*self._sgd(model.parameters(), total_steps))


@OPTIMIZERS.register("prox-sgd", "SGD followed by the l1 soft threshold lr*lambda")
class ProxSGD(_Momentum):
    r"""SGD with momentum, then :math:`w \leftarrow S_{\eta_t\lambda}(w)` on conv and linear
    weights: the baseline whose zeros fade as the learning rate decays."""

    knobs: ClassVar[tuple[str, ...]] = ("lambda_",)

    lambda_: Number = Field(1e-3, ge=0, description="l1 strength on conv and linear weights")

    def build(self, model: nn.Module, total_steps: int) -> OptimizerParts:
        import torch

        from distrib_rda.optim import ProxSGD as ProxSGDOptimizer
        from distrib_rda.optim import rda_param_groups
        from distrib_rda.optim.parts import OptimizerParts

        optimizer = ProxSGDOptimizer(rda_param_groups(model, self.lambda_), lr=self.lr,
                                     momentum=self.momentum)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        return OptimizerParts(optimizer, scheduler)


@OPTIMIZERS.register("gmp", "gradual magnitude pruning (Zhu & Gupta 2017) of SGD")
class GMP(_Momentum):
    """SGD with momentum whose smallest weights (global magnitude) are masked on the cubic
    schedule, up to ``target_sparsity`` at the end of the ramp; the mask is then trained."""

    knobs: ClassVar[tuple[str, ...]] = ("target_sparsity",)

    target_sparsity: Number = Field(..., gt=0, lt=1, description="the final fraction of zeros")
    ramp: Ramp = (0.1, 0.6)
    prunings: Integer = Field(40, ge=1, le=100_000,
                              description="mask updates over the ramp (Zhu & Gupta's n)")

    _ramp = field_validator("ramp")(_check_ramp)

    def build(self, model: nn.Module, total_steps: int) -> OptimizerParts:
        from distrib_rda.optim import MagnitudePruner, prunable_weights
        from distrib_rda.optim.parts import OptimizerParts

        start, end = (int(fraction * total_steps) for fraction in self.ramp)
        pruner = MagnitudePruner(
            [weight for _, weight in prunable_weights(model)],
            target_sparsity=self.target_sparsity, start_step=start, end_step=end,
            frequency=max(1, (end - start) // self.prunings))
        return OptimizerParts(*self._sgd(model.parameters(), total_steps), pruner)


@OPTIMIZERS.register("rda", "l1-regularized dual averaging: the sparsity you name, found by l1",
                     default=True)
class RDA(_Momentum):
    r"""l1-RDA (:class:`distrib_rda.optim.RDA`), centred at the initialization.

    With ``target_sparsity`` :math:`s` (the default), the l1 strength is not given but found:
    the threshold :math:`\tau_t` of the update :math:`w = S_{\tau_t}(u_t)`,
    :math:`u_t = w_1 - G_t/\beta_t`, is the :math:`s_t`-quantile of :math:`|u_t|` over all conv
    and linear weights together, with :math:`s_t` on the cubic ``ramp`` to :math:`s`. That is
    l1-RDA with the time-varying strength :math:`\lambda_t = \tau_t\beta_t/t`. A weight set to
    zero keeps adding its gradients to :math:`G` and comes back when :math:`|u_t|` passes
    :math:`\tau_t`. With ``lambda_`` instead, the strength is fixed and the sparsity is what it
    gives.

    The last ``finetune_epochs`` of the run (half of them by default) train the surviving
    weights with the mask fixed (SGD with ``lr``, ``momentum``, cosine decay).
    """

    dual_averaging: ClassVar[bool] = True
    knobs: ClassVar[tuple[str, ...]] = ("target_sparsity", "lambda_")

    target_sparsity: Number | None = Field(
        0.95, gt=0, lt=1, description="the fraction of conv and linear weights that are zero at "
        "the end; RDA finds its l1 strength (leave it out with --lambda)")
    lambda_: Number | None = Field(
        None, ge=0, description="a fixed l1 strength instead of a target sparsity")
    ramp: Ramp = (0.1, 0.6)
    threshold: Literal["soft", "hard"] = Field(
        "hard", description="soft: the l1 prox S_tau(u); hard: u kept whole where |u| > tau")
    gamma: Number = Field(0.15, gt=0, description="beta_t = gamma*(t + warmup)^power")
    warmup: Number = Field(1000.0, ge=0, description="t_w in beta_t: caps the first steps")
    power: Number = Field(0.5, ge=0, le=1, description="p in beta_t = gamma*(t + t_w)^p")
    adaptive: Switch = Field(False, description="diagonal AdaGrad beta_t instead")
    eps: Number = Field(1e-8, gt=0, description="added to the AdaGrad denominator")
    center: Literal["init", "zero"] = Field("init", description="the prox centre")
    fused: Switch | None = Field(
        None, description="one compiled kernel per tensor (torch.compile); default: on CUDA "
        "only, as torch's own optimizers choose their fast path")
    restart: list[Integer] = Field(default_factory=list, description="epochs to re-centre at")
    finetune_epochs: Integer | None = Field(
        None, ge=0, le=10_000, description="the last epochs of the run train the surviving "
        "weights with the mask fixed; default: half of the epochs")

    @model_validator(mode="before")
    @classmethod
    def _lambda_or_target(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("lambda_") is not None:
            if data.get("target_sparsity") is not None:
                raise ValueError("lambda_ (--lambda) and target_sparsity (--target-sparsity) "
                                 "are two ways to set the l1 strength; give one")
            data = {**data, "target_sparsity": None}
        return data

    _ramp = field_validator("ramp")(_check_ramp)

    @field_validator("restart")
    @classmethod
    def _increasing(cls, restart: list[int]) -> list[int]:
        if any(epoch < 1 for epoch in restart) or sorted(set(restart)) != restart:
            raise ValueError("must be increasing epoch numbers >= 1")
        return restart

    @model_validator(mode="after")
    def _consistent(self) -> RDA:
        if self.target_sparsity is None and self.lambda_ is None:
            raise ValueError("give target_sparsity (--target-sparsity) or lambda_ (--lambda)")
        if self.adaptive and self.target_sparsity is not None:
            raise ValueError("adaptive (--adaptive) gives every weight its own threshold, so a "
                             "target sparsity cannot set one; with adaptive, give lambda_ "
                             "(--lambda)")
        if self.restart and self.center == "zero":
            raise ValueError("restart re-centres at w; it needs center: init (a zero centre "
                             "with G reset to 0 would collapse the weights)")
        return self

    def build(self, model: nn.Module, total_steps: int) -> OptimizerParts:
        from distrib_rda.optim import RDA as RDAOptimizer
        from distrib_rda.optim import rda_param_groups
        from distrib_rda.optim.parts import OptimizerParts

        groups = rda_param_groups(model, self.lambda_ or 0.0)
        if self.target_sparsity is not None:
            start, end = (int(fraction * total_steps) for fraction in self.ramp)
            groups[0]["target_sparsity"] = self.target_sparsity
            groups[0]["ramp"] = (start, max(end, start + 1))
        return OptimizerParts(RDAOptimizer(
            groups, gamma=self.gamma, adaptive=self.adaptive, eps=self.eps, center=self.center,
            warmup=self.warmup, power=self.power, fused=self.fused, threshold=self.threshold))

    def build_finetune(self, model: nn.Module, total_steps: int) -> OptimizerParts:
        r"""The closing fine-tune: SGD with momentum on every parameter, cosine decay from
        ``lr`` over ``total_steps``, and the support of the conv and linear weights fixed:
        :math:`m = \mathbb{1}[w \ne 0]`, :math:`w \leftarrow m \odot \operatorname{SGD}(w)`.
        Sparsity cannot change; accuracy is what the surviving weights can reach."""
        from distrib_rda.optim import prunable_weights
        from distrib_rda.optim.parts import FixedMask, OptimizerParts

        mask = FixedMask([weight for _, weight in prunable_weights(model)])
        return OptimizerParts(*self._sgd(model.parameters(), total_steps), mask)
