"""Expansion: the teacher writes new prompts from seed prompts (few-shot, diversity controls, lineage).

    from tasks.expand import ExpandConfig, run_expand_stage
    manifest = run_expand_stage(teacher_dir, "prompts/train.parquet", "expanded/", ExpandConfig(num_prompts=500), teacher_cfg.engine)
    # then: tasks.curate.run_curate_stage("expanded/prompts.parquet", "curated/", CurateConfig(), heldout="prompts/test.parquet")
"""

from tasks.expand.config import ExpandConfig
from tasks.expand.stage import (
    EXPANDED_SCHEMA,
    ExpansionError,
    expand_with_llm,
    fewshot_request,
    parse_instruction,
    read_seeds,
    run_expand_stage,
)

__all__ = ["EXPANDED_SCHEMA", "ExpandConfig", "ExpansionError", "expand_with_llm", "fewshot_request", "parse_instruction",
           "read_seeds", "run_expand_stage"]
