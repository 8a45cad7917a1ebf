"""Prompt formatting shared by every stage, so teacher, student and evaluation see identical text."""

from __future__ import annotations

from storage.errors import UserError

DEFAULT_TEMPLATE = "{prompt}\nAnswer:"


class PromptError(UserError):
    """A prompt cannot be rendered (no chat template, or the template rejects the turns)."""


def chat_prompt(tokenizer, turns: list[dict[str, str]], where: str = "prompt") -> str:
    """The turns rendered by the tokenizer's chat template, ending with the assistant's generation prompt."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise PromptError(f"{where}: the tokenizer has no chat template; set data.use_chat_template false or use an instruct model")
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2 TemplateError, or a template's own raise_exception(...)
        roles = [t.get("role") for t in turns]
        raise PromptError(f"{where}: the tokenizer's chat template rejects the turns {roles} ({exc}); "
                          "fix the conversation's roles or order") from exc


def format_prompt(prompt: str, template: str | None = DEFAULT_TEMPLATE, tokenizer=None, use_chat_template: bool = False) -> str:
    if use_chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.use_chat_template is true but the tokenizer has no chat template; set it false or use an instruct model")
        return chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return (template or DEFAULT_TEMPLATE).format(prompt=prompt)
