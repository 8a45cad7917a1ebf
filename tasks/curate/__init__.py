"""Curation: dedup (exact, near), length, repetition, held-out decontamination and teacher self-score filters.

    from tasks.curate import CurateConfig, run_curate_stage
    manifest = run_curate_stage("prompts/train.parquet", "curated/", CurateConfig(), heldout="prompts/test.parquet")
    manifest.removed_by()   # {"exact_dedup": 3, "near_dedup": 1, ...} in the order the filters ran
"""

from tasks.curate.config import FILTER_ORDER, CurateConfig
from tasks.curate.stage import CurateManifest, CurationError, FilterReport, curate_rows, run_curate_stage, scores_from_labels

__all__ = ["FILTER_ORDER", "CurateConfig", "CurateManifest", "CurationError", "FilterReport", "curate_rows",
           "run_curate_stage", "scores_from_labels"]
