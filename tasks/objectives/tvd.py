"""Total variation distance."""

from __future__ import annotations

from torch import Tensor

from .registry import register
from .support import Buckets


@register("tvd")
def tvd(b: Buckets) -> Tensor:
    """0.5 * sum |p - q|: bounded in [0, 1] and insensitive to log-ratio outliers."""
    return 0.5 * (b.logp.exp() - b.logq.exp()).abs().sum(-1)
