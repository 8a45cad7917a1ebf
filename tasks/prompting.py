"""Prompt formatting shared by every stage, so teacher, student and evaluation see identical text."""

from __future__ import annotations

DEFAULT_TEMPLATE = "{prompt}\nAnswer:"


def format_prompt(prompt: str, template: str = DEFAULT_TEMPLATE, tokenizer=None, use_chat_template: bool = False) -> str:
    if use_chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.use_chat_template is true but the tokenizer has no chat template; set it false or use an instruct model")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return template.format(prompt=prompt)
