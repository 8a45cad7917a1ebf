"""The prompt shard schema and the data stage's error type."""

from __future__ import annotations

import pyarrow as pa

from storage.errors import UserError

# One row per prompt. `prompt` is the text a person reads (the filled template, or for conversations the
# rendered chat); `prompt_ids` is exactly what the models see; `references` may be empty.
PROMPT_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("prompt", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("references", pa.list_(pa.string())),
    ]
)


class DataError(UserError):
    """The dataset cannot be used; the message names the file (and row, field) and what to do."""
