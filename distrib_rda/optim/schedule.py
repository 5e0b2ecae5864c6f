r"""The sparsity a run has reached at step :math:`t`: Zhu & Gupta's cubic ramp, shared by
gradual magnitude pruning and RDA with a target sparsity.

.. math::
    s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_1 - t_0}\right)^3,
    \qquad t_0 \le t \le t_1,

with :math:`s_t = 0` before :math:`t_0` and :math:`s_t = s_f` from :math:`t_1` on. The ramp is
steep at first, when many weights are redundant, and flat at the end, when each one counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cubic_sparsity", "magnitude_quantile"]


def cubic_sparsity(step: float, start: float, end: float, final: float,
                   initial: float = 0.0) -> float:
    """:math:`s_t` of the module docstring (``start`` = :math:`t_0`, ``end`` =
    :math:`t_1 \\ge t_0`; ``end == start`` jumps to ``final``)."""
    if step < start:
        return 0.0
    if step >= end:
        return final
    fraction = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - fraction) ** 3


@torch.no_grad()
def magnitude_quantile(tensors: list[Tensor], sparsity: float) -> float:
    r"""The threshold :math:`\tau` below which a fraction ``sparsity`` of the elements of
    ``tensors`` (all together) lie: the :math:`k`-th smallest :math:`|x|`,
    :math:`k = \operatorname{round}(sN)`, so that exactly :math:`k` elements have
    :math:`|x| \le \tau` when magnitudes are distinct. 0 when :math:`k = 0`."""
    total = sum(t.numel() for t in tensors)
    k = round(sparsity * total)
    if k <= 0:
        return 0.0
    magnitudes = torch.cat([t.detach().reshape(-1).abs() for t in tensors])
    return float(magnitudes.kthvalue(min(k, total)).values)
