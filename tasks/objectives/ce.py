"""Cross-entropy on the realised / reference token."""

from __future__ import annotations

from torch import Tensor

from .registry import register


@register("ce", uses_teacher=False)
def ce(target_logprobs: Tensor) -> Tensor:
    """-log q(target) under the student's full-vocabulary softmax at temperature 1.

    Always temperature 1 and never scaled by tau^2: it is the ordinary language-modelling
    loss on hard labels, and the temperature belongs to the soft-label (teacher) terms.
    The support policy does not apply (the target is one id, not the teacher's top-k).
    """
    return -target_logprobs[:, 0]
