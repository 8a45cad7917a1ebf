"""Dataset layouts: a prompt column, Alpaca's instruction/input/output, or a conversation of role/content turns.

`resolve_layout` picks the layout (data.format, or by the columns for `auto`) and
checks the prompt template's placeholders against the columns before anything is
tokenised; `Layout.convert` turns one Arrow batch into prompts, the text the
models see, the text used to compare prompts, references and ids, naming the
file, row and field of the first bad value.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from tasks.config import DataConfig
from tasks.data.reading import Part
from tasks.data.schema import DataError
from tasks.prompting import PromptError
from tasks.prompting import chat_prompt as _chat_prompt

PROMPT_TEMPLATE = "{prompt}\nAnswer:"
PROMPT_TEMPLATE_CHAT = "{prompt}"
ALPACA_TEMPLATE = "{instruction}\n\n{input}"
ALPACA_COLUMNS = ("instruction", "output")   # "input" is optional
ID_FIELD = "id"


def placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def detect_format(cfg: DataConfig, columns: list[str], where: str) -> str:
    """data.format, or for 'auto': messages if its column is present, else alpaca if 'instruction' and 'output' are,
    else prompt."""
    cols = set(columns)
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_field in cols:
        return "messages"
    if all(c in cols for c in ALPACA_COLUMNS):
        return "alpaca"
    return "prompt"  # its missing columns are named by Layout.check_columns


@dataclass(frozen=True)
class Converted:
    """One batch: parallel lists, one entry per row."""

    prompts: list[str]          # stored in the shard's `prompt` column: the filled template (the raw prompt under the
                                # default prompt-format template), or the rendered chat for messages
    texts: list[str]            # what the tokenizer encodes
    keys: list[str]             # compared across splits after normalisation
    references: list[list[str]]
    ids: list[str | None]       # the row's `id`, or None


@dataclass(frozen=True)
class Layout:
    format: str                  # prompt | messages | alpaca
    template: str | None         # named template (prompt, alpaca); None for messages
    chat: bool                   # render with the tokenizer's chat template
    cfg: DataConfig

    def column(self, name: str) -> str:
        """The column a placeholder reads: {prompt} is data.prompt_field's column in format prompt."""
        return self.cfg.prompt_field if self.format == "prompt" and name == "prompt" else name

    def setting(self, column: str) -> str:
        if self.format == "prompt" and column == self.cfg.prompt_field:
            return "data.prompt_field"
        return "alpaca format" if self.format == "alpaca" and column in ALPACA_COLUMNS else "data.prompt_template"

    def check_columns(self, columns: list[str] | None, where: str) -> None:
        """Every column this layout reads exists (an empty file has none to check)."""
        if columns is None:
            return
        cols = set(columns)
        if self.format == "messages":
            if self.cfg.messages_field not in cols:
                raise DataError(f"{where}: field {self.cfg.messages_field!r} (data.messages_field) missing; the columns are {sorted(cols)}")
            return
        for column in self.required_columns():
            if column not in cols:
                setting = self.setting(column)
                hint = {"data.prompt_template": "; use column names as placeholders",
                        "data.prompt_field": f"; set data.prompt_field, or data.format if the rows are {self.cfg.messages_field!r} "
                                             "conversations or alpaca instruction/output"}.get(setting, "")
                raise DataError(f"{where}: field {column!r} ({setting}) missing; the columns are {sorted(cols)}{hint}")
        if self.format == "prompt" and self.cfg.reference_field is not None and self.cfg.reference_field not in cols:
            raise DataError(f"{where}: field {self.cfg.reference_field!r} (data.reference_field) missing; the columns are "
                            f"{sorted(cols)}; set data.reference_field to null if there are no references")

    def required_columns(self) -> list[str]:
        cols = [self.column(n) for n in placeholders(self.template or "")]
        if self.format == "alpaca":
            cols = [c for c in cols if c != "input"] + [c for c in ALPACA_COLUMNS if c not in cols]
        return list(dict.fromkeys(cols))

    def convert(self, batch: dict[str, list[Any]], part: Part, start: int, tokenizer) -> Converted:
        n = len(next(iter(batch.values()))) if batch else 0
        ids = [None if v is None else str(v) for v in batch.get(ID_FIELD, [None] * n)]
        out = Converted([], [], [], [], ids)
        for i in range(n):
            row = {k: v[i] for k, v in batch.items()}
            where = part.where(start + i)
            if self.format == "messages":
                prompt, key, refs = self._messages(row, where, tokenizer)
                text = prompt
            else:
                filled = self._fill(row, where)
                # the default prompt template only adds the demo's answer cue: store (and compare) the prompt itself
                key = prompt = str(row[self.cfg.prompt_field]) if self.format == "prompt" and self.cfg.prompt_template is None else filled
                refs = self._references(row, where)
                text = chat_prompt(tokenizer, [{"role": "user", "content": filled}], where) if self.chat else filled
            out.prompts.append(prompt)
            out.texts.append(text)
            out.keys.append(key)
            out.references.append(refs)
        return out

    # --- prompt and alpaca ----------------------------------------------------------------------

    def _fill(self, row: dict[str, Any], where: str) -> str:
        template = self.template
        if self.format == "alpaca" and self.cfg.prompt_template is None and not _text(row.get("input")).strip():
            template = "{instruction}"
        fields = {}
        for name in placeholders(template):
            column = self.column(name)
            value = row.get(column)
            optional = self.format == "alpaca" and column == "input"
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = str(value)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: field {column!r} ({self.setting(column)}) is {value!r} ({type(value).__name__}); "
                                "expected a string")
            if not optional and (value is None or not value.strip()):
                raise DataError(f"{where}: field {column!r} ({self.setting(column)}) is missing or empty; "
                                "it must be a non-empty string")
            fields[name] = value or ""
        return template.format(**fields)

    def _references(self, row: dict[str, Any], where: str) -> list[str]:
        field = "output" if self.format == "alpaca" else self.cfg.reference_field
        if field is None:
            return []
        value = row.get(field)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(r, str) for r in value):
            return list(value)
        if isinstance(value, list):
            j = next(j for j, r in enumerate(value) if not isinstance(r, str))
            got = f"a list whose item {j} is {value[j]!r} ({type(value[j]).__name__})"
        else:
            got = f"{value!r} ({type(value).__name__})"
        expected = "a string" if self.format == "alpaca" else "a string or a list of strings (or null)"
        return _raise(f"{where}: field {field!r} is {got}; expected {expected}")

    # --- messages -------------------------------------------------------------------------------

    def _messages(self, row: dict[str, Any], where: str, tokenizer) -> tuple[str, str, list[str]]:
        field = self.cfg.messages_field
        turns = row.get(field)
        if not isinstance(turns, list) or not turns:
            got = "missing or empty" if not turns else f"{type(turns).__name__}"
            raise DataError(f"{where}: field {field!r} (data.messages_field) is {got}; expected a list of {{role, content}} turns")
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
                raise DataError(f"{where}: field {field!r} turn {j} is {turn!r}; each turn needs a string 'role' and a string 'content'")
        if turns[-1]["role"] == "assistant":
            prompt_turns, refs = turns[:-1], [turns[-1]["content"]]
        else:
            prompt_turns, refs = turns, []
        if not any(t["role"] != "system" for t in prompt_turns):
            raise DataError(f"{where}: field {field!r} has no user turn before the last assistant turn; a prompt needs one")
        prompt_turns = [{"role": t["role"], "content": t["content"]} for t in prompt_turns]
        text = chat_prompt(tokenizer, prompt_turns, where)
        key = "\n".join(f"{t['role']}: {t['content']}" for t in prompt_turns)
        return text, key, refs


def chat_prompt(tokenizer, turns: list[dict[str, str]], where: str) -> str:
    try:
        return _chat_prompt(tokenizer, turns, where)
    except PromptError as exc:
        raise DataError(str(exc)) from exc.__cause__


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _raise(message: str):
    raise DataError(message)


def resolve_layout(cfg: DataConfig, columns: list[str], where: str, tokenizer, tokenizer_dir: str) -> Layout:
    """The layout for these columns, its template checked against them and the chat template present where needed."""
    fmt = detect_format(cfg, columns, where)
    chat = fmt == "messages" or cfg.use_chat_template
    if chat and not getattr(tokenizer, "chat_template", None):
        why = "data.format is messages" if fmt == "messages" else "data.use_chat_template is true"
        raise DataError(f"{why} but the tokenizer in {tokenizer_dir} has no chat template; use an instruct model's tokenizer"
                        + ("" if fmt == "messages" else ", or set data.use_chat_template false"))
    if fmt == "messages":
        if cfg.prompt_template is not None:
            raise DataError("data.prompt_template does not apply to data.format messages (the chat template renders the turns); "
                            "remove it")
        template = None
    elif cfg.prompt_template is not None:
        template = cfg.prompt_template
    elif fmt == "alpaca":
        template = ALPACA_TEMPLATE
    else:
        template = PROMPT_TEMPLATE_CHAT if chat else PROMPT_TEMPLATE
    layout = Layout(format=fmt, template=template, chat=chat, cfg=cfg)
    layout.check_columns(columns, where)
    return layout
