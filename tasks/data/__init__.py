"""Prepare stage: read the prompt dataset (prompt, messages or Alpaca layout), check it, write tokenised prompt shards.

- `reading`: where each split's rows come from (folders, globs, hub ids) and Arrow batches of them;
- `formats`: the three layouts, template placeholders, references;
- `checks`: duplicates, split leakage, the held-out fraction, top-k;
- `stage`: `prepare`, which runs them in order and writes the shards and manifest.
"""

from tasks.data.schema import PROMPT_SCHEMA, DataError
from tasks.data.stage import load_rows, prepare, read_prompts

__all__ = ["PROMPT_SCHEMA", "DataError", "load_rows", "prepare", "read_prompts"]
