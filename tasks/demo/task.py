"""A deterministic instruction task whose answers have several acceptable forms.

Every prompt has one correct answer but several phrasings of it ("8", "The answer
is 8.", "3 plus 5 is 8."), drawn with fixed probabilities. A teacher trained on
this data spreads its probability over the phrasings, so its top-k distribution
carries information beyond its top token; exact match (the response is one of
the acceptable phrasings) and ROUGE-L (against the closest phrasing) stay
meaningful.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")

_WORDS = (
    "apple river stone cloud tiger lamp forest candle mirror garden "
    "pencil rocket violin castle harbor meadow winter summer bridge island "
    "window planet basket feather dragon market silver thunder engine valley"
).split()

_OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark",
    "open": "closed", "early": "late", "happy": "sad", "hard": "soft", "old": "new",
    "wet": "dry", "loud": "quiet", "full": "empty", "rich": "poor", "high": "low",
    "near": "far", "strong": "weak", "thick": "thin", "clean": "dirty", "first": "last",
}

_COLORS = {
    "banana": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black",
    "cherry": "red", "orange": "orange", "lemon": "yellow", "leaf": "green", "ocean": "blue",
    "milk": "white", "crow": "black", "tomato": "red", "carrot": "orange", "plum": "purple",
    "violet": "purple", "pumpkin": "orange", "strawberry": "red", "cloud": "white", "frog": "green",
}


@dataclass(frozen=True)
class Example:
    id: str
    task: str
    prompt: str
    response: str            # one phrasing, drawn like the training data's
    references: list[str]    # every acceptable phrasing; the first is canonical


def _phrase(rng: random.Random, forms: list[str], weights: tuple[float, ...]) -> str:
    return rng.choices(forms, weights=weights[: len(forms)], k=1)[0]


def _make(rng: random.Random, index: int) -> Example:
    kind = rng.choice(("add", "bigger", "opposite", "color", "next", "count"))
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        prompt = f"What is {a} plus {b}?"
        forms = [f"{a + b}", f"The answer is {a + b}.", f"{a} plus {b} is {a + b}."]
    elif kind == "bigger":
        a, b = rng.sample(range(10), 2)
        prompt = f"Which is bigger, {a} or {b}?"
        forms = [f"{max(a, b)}", f"{max(a, b)} is bigger.", f"The bigger one is {max(a, b)}."]
    elif kind == "opposite":
        pairs = list(_OPPOSITES.items())
        word, opp = rng.choice(pairs)
        if rng.random() < 0.5:
            word, opp = opp, word
        prompt = f"What is the opposite of {word}?"
        forms = [opp, f"The opposite of {word} is {opp}."]
    elif kind == "color":
        thing, color = rng.choice(list(_COLORS.items()))
        prompt = f"What color is {thing}?"
        forms = [color, f"{thing.capitalize()} is {color}.", f"It is {color}."]
    elif kind == "next":
        n = rng.randint(0, 29)
        prompt = f"What number comes after {n}?"
        forms = [f"{n + 1}", f"After {n} comes {n + 1}."]
    else:
        words = rng.sample(_WORDS, rng.randint(1, 5))
        prompt = "How many words are in: " + " ".join(words) + "?"
        forms = [f"{len(words)}", f"There are {len(words)} words."]
    response = _phrase(rng, forms, (0.5, 0.3, 0.2))
    return Example(id=f"demo-{index:06d}", task=kind, prompt=prompt, response=response, references=forms)


def generate(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[Example]]:
    """Return the splits; the same seed always gives the same examples."""
    sizes = sizes or {"train": 6000, "validation": 200, "test": 300}
    rng = random.Random(seed)
    index = 0
    splits: dict[str, list[Example]] = {}
    for split in SPLITS:
        rows = []
        for _ in range(sizes[split]):
            rows.append(_make(rng, index))
            index += 1
        splits[split] = rows
    return splits


def write_jsonl(splits: dict[str, list[Example]], out_dir: Path) -> dict[str, Path]:
    """Write one JSONL file per split (temporary name, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        path = out_dir / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(asdict(row)) + "\n")
        tmp.replace(path)
        paths[split] = path
    return paths
