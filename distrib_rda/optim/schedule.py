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


# magnitude_quantile brackets the k-th magnitude with a strided sample of one element in
# SAMPLE_EVERY and a margin of BRACKET_MARGIN in quantile: three standard errors of the
# sample's 0.95-quantile at the smallest sample (16Ki elements, at EXACT_BELOW), ten at
# 180Ki (ResNet-18). A miss costs only the direct selection; below EXACT_BELOW elements it
# selects directly.
SAMPLE_EVERY = 64
BRACKET_MARGIN = 0.005
EXACT_BELOW = 1 << 20


@torch.no_grad()
def magnitude_quantile(tensors: list[Tensor], sparsity: float) -> float:
    r"""The threshold :math:`\tau` below which a fraction ``sparsity`` of the elements of
    ``tensors`` (all together) lie: the :math:`k`-th smallest :math:`|x|`,
    :math:`k = \operatorname{round}(sN)`, so that exactly :math:`k` elements have
    :math:`|x| \le \tau` when magnitudes are distinct. 0 when :math:`k = 0`.

    Exact, without sorting or copying all :math:`N` magnitudes: a strided sample gives a
    bracket :math:`[l, h]` around the quantile; one pass counts the :math:`b` magnitudes
    below :math:`l` and keeps those inside the bracket, and the answer is the
    :math:`(k - b)`-th smallest of those. Should the bracket miss (:math:`k \le b` or
    :math:`k > b + |\text{bracket}|`), all magnitudes are selected from directly."""
    total = sum(t.numel() for t in tensors)
    k = min(round(sparsity * total), total)
    if k <= 0:
        return 0.0
    flat = [t.detach().reshape(-1) for t in tensors]
    if total >= EXACT_BELOW:
        sample = torch.cat([x[::SAMPLE_EVERY].abs() for x in flat])
        size, fraction = sample.numel(), k / total
        low_rank = int((fraction - BRACKET_MARGIN) * size)
        high_rank = int((fraction + BRACKET_MARGIN) * size) + 1
        low = float(sample.kthvalue(low_rank).values) if low_rank >= 1 else 0.0
        high = float(sample.kthvalue(high_rank).values) if high_rank <= size else float("inf")
        below = torch.zeros((), dtype=torch.int64, device=flat[0].device)
        inside = []
        for x in flat:
            magnitude = x.abs()
            below += (magnitude < low).sum()
            inside.append(magnitude[(magnitude >= low) & (magnitude <= high)])
        below_count, bracket = int(below), torch.cat(inside)
        if below_count < k <= below_count + bracket.numel():
            return float(bracket.kthvalue(k - below_count).values)
    return float(torch.cat([x.abs() for x in flat]).kthvalue(k).values)
