"""Knowledge-distillation objectives on sparse stored teacher labels.

The teacher is stored as top-k log-probs plus the log of the mass outside the top-k
(``SparseLabels``).  Every divergence is computed between two distributions over the same
small set of buckets built by a *support policy*:

``tail_bucket`` (default)
    p = the k teacher probs + one bucket exp(tail_logmass); q = the student's k probs
    (full-vocabulary softmax) + one bucket 1 - sum of them.  This is the exact divergence
    between the full-vocabulary distributions coarse-grained onto {top-k ids, rest}, so it
    keeps the teacher's calibration: the student is told how much mass belongs *outside*
    the top-k, and it lower-bounds the full-vocabulary divergence (data processing).
``renormalize``
    p and q both renormalised over the teacher's top-k ids.  What most top-k KD
    implementations do, but it is blind to the student's total mass on the top-k: a
    student that puts 90% of its mass on junk tokens, with the right ratios among the
    top-k, gets zero loss; with small k it also trains the student to be over-confident.

``tail_bucket`` is the default because it uses information we already store (the tail
mass) and has no such blind spot; both policies coincide when k = V.

Student-side cost is one chunked full-vocabulary log-softmax pass (see ``support.py``);
nothing of size B x T x V is built for the teacher.

    from tasks.objectives import build_objective, SparseLabels
    loss_fn = build_objective("0.5*akl+0.5*ce", temperature=1.0, mu=0.5)
    loss = loss_fn(student_logits, labels, mask, num_valid_tokens=global_count)
    loss_fn.last_parts  # {"akl": ..., "ce": ...}
"""

from . import kl, jsd, tvd, skew, akl, ce  # noqa: F401,I001  (registers them, in this order)
from .labels import SparseLabels
from .mixture import Objective, build_objective, get_objective, parse_spec
from .registry import registered_names
from .support import DEFAULT_SUPPORT, SUPPORTS

OBJECTIVE_NAMES: tuple[str, ...] = registered_names()

__all__ = [
    "DEFAULT_SUPPORT",
    "OBJECTIVE_NAMES",
    "SUPPORTS",
    "Objective",
    "SparseLabels",
    "build_objective",
    "get_objective",
    "parse_spec",
]
