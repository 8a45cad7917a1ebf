"""The demo's *base* student: the student architecture pre-trained briefly as a plain language model.

Real distillation starts from a pretrained student that already knows the
language and some facts, but has not been trained on the task's
question -> answer format. The demo imitates that with a corpus of generated
declarative sentences over the same vocabulary ("The sum of 3 and 5 is 8.",
"Snow is white.", "Hot and cold are opposites.", "One box, many boxes.",
"Wonderful is a positive word."): the world knowledge the task draws on, written
as statements. It never contains a prompt template, the "Answer:" marker or an
answer phrasing, so a student trained on it has seen the facts (as a web-trained
LM has) but not the task, and its held-out exact match before distillation stays
near zero (measured by flows/compare.py as the `init` row).

Why generated statements and not the task's own text: pre-training on the
question -> answer pairs would be SFT under another name (MiniLLM's second
starting point, `train.init: sft`), and the comparison needs the two apart.
"""

from __future__ import annotations

import random

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tasks.demo import task as demo_task
from tasks.demo.train_teacher import fit_causal_lm


def _qa_statement(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return rng.choice((f"The sum of {a} and {b} is {a + b}.", f"Adding {b} to {a} gives {a + b}."))
    if kind == 1:
        a, b = sorted(rng.sample(range(10), 2))
        return rng.choice((f"{b} is more than {a}.", f"{a} is less than {b}."))
    if kind == 2:
        word, opp = rng.choice(list(demo_task._OPPOSITES.items()))
        return rng.choice((f"{word.capitalize()} and {opp} are opposites.", f"{opp.capitalize()} is the reverse of {word}."))
    if kind == 3:
        thing, color = rng.choice(list(demo_task._COLORS.items()))
        return rng.choice((f"{thing.capitalize()} is {color}.", f"Every {thing} I saw was {color}."))
    if kind == 4:
        n = rng.randint(0, 49)
        return rng.choice((f"The number {n + 1} follows {n}.", f"Counting up, {n} then {n + 1}."))
    words = rng.sample(demo_task._WORDS, rng.randint(1, 5))
    return f"The list {' '.join(words)} holds {len(words)} words."


def _transform_statement(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        word = rng.choice(demo_task._SHORT_WORDS)
        return rng.choice((f"{word.capitalize()} in capital letters is {word.upper()}.", f"{word.upper()} is {word} shouted."))
    if kind == 1:
        noun, plural = rng.choice(list(demo_task._PLURALS.items()))
        return rng.choice((f"One {noun}, many {plural}.", f"We saw a {noun} and then three {plural}."))
    words = rng.sample(demo_task._SHORT_WORDS, rng.randint(2, 3))
    if kind == 2:
        return f"Read backwards, {' '.join(words)} becomes {' '.join(reversed(words))}."
    return f"The phrase {' '.join(words)} ends with {words[-1]}."


def _classify_statement(rng: random.Random) -> str:
    if rng.random() < 0.5:
        label = rng.choice(tuple(demo_task._SENTIMENT))
        adj = rng.choice(demo_task._SENTIMENT[label])
        if rng.random() < 0.5:
            return f"{adj.capitalize()} is a {label} word."
        return f"{rng.choice(demo_task._SUBJECTS).capitalize()} {rng.choice(demo_task._VERBS)} {adj}."
    label = rng.choice(tuple(demo_task._TOPICS))
    subjects, predicates = demo_task._TOPICS[label]
    if rng.random() < 0.5:
        return f"{rng.choice(subjects).capitalize()} {rng.choice(predicates)}."
    return f"People talk about {label} when {rng.choice(subjects)} {rng.choice(predicates)}."


_STATEMENTS = {"qa": _qa_statement, "transform": _transform_statement, "classify": _classify_statement}


def corpus(task: str, size: int = 20000, seed: int = 0) -> list[str]:
    """Generated statements for the families of a demo task selection (all three for `mix`)."""
    families = demo_task.FAMILIES if task == "mix" else (task,)
    rng = random.Random(f"corpus:{task}:{seed}")
    return [_STATEMENTS[rng.choice(families)](rng) for _ in range(size)]


def pretrain_lm(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], *, steps: int,
                batch_size: int = 32, lr: float = 3e-3, seed: int = 0, log_fn=print) -> float:
    """Next-token cross-entropy on every token of `<s> text </s>`; returns the last loss."""
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return fit_causal_lm(model, [(seq[:1], seq[1:]) for seq in encoded], tokenizer.pad_token_id, steps=steps,
                         batch_size=batch_size, lr=lr, seed=seed, log_fn=log_fn, what="demo base student", loss_name="LM loss")
