"""Objective registry: exact names -> per-token loss definitions.

Names are looked up exactly (no substring / prefix matching) so that e.g. "kl" can never
silently resolve to "fkl" or "akl".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import Tensor


@dataclass(frozen=True)
class ObjectiveDef:
    """One registered objective.

    ``fn(buckets, **params) -> [N]`` for divergences (``uses_teacher=True``: they see the
    support policy and the temperature); ``fn(target_logprobs [N], **params) -> [N]`` for
    target losses (``ce``), which see neither.
    """

    name: str
    fn: Callable[..., Tensor]
    defaults: Mapping[str, float] = field(default_factory=dict)
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # closed [lo, hi]
    uses_teacher: bool = True

    def resolve_params(self, params: Mapping[str, object]) -> dict[str, float]:
        """Defaults overridden by ``params``; unknown or out-of-range values raise ValueError."""
        out = dict(self.defaults)
        for key, value in params.items():
            if key not in self.defaults:
                raise ValueError(
                    f"objective {self.name!r} does not take parameter {key!r}; "
                    f"valid parameters: {_list(self.defaults) or 'none'}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"parameter {key!r} of {self.name!r} must be a finite number, got {value!r}")
            lo, hi = self.bounds.get(key, (-math.inf, math.inf))
            if not lo <= value <= hi:
                raise ValueError(f"parameter {key!r} of {self.name!r} must be in [{lo}, {hi}], got {value!r}")
            out[key] = float(value)
        return out


_REGISTRY: dict[str, ObjectiveDef] = {}


def register(
    name: str,
    defaults: Mapping[str, float] | None = None,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    uses_teacher: bool = True,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} registered twice")
        _REGISTRY[name] = ObjectiveDef(name, fn, dict(defaults or {}), dict(bounds or {}), uses_teacher)
        return fn

    return deco


def lookup(name: object) -> ObjectiveDef:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; valid: {_list(_REGISTRY)}")
    return _REGISTRY[name]


def registered_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all_param_names() -> tuple[str, ...]:
    return tuple(sorted({p for d in _REGISTRY.values() for p in d.defaults}))


def _list(names) -> str:
    return ", ".join(sorted(names))

