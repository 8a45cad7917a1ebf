"""Deterministic demo tasks whose answers have several acceptable forms, with evaluation prompts never seen in training.

Three families, each a set of kinds with several prompt templates:
- `qa` (the original demo): additions, which-is-bigger, opposites, colours,
  next number, word count ("What is 3 plus 5?" -> "8" | "The answer is 8." | "3 plus 5 is 8.");
- `transform`: text transformations ("Uppercase: red fox" -> "RED FOX" |
  "In capitals: RED FOX."; plurals, reversing word order, first/last word);
- `classify`: classification framed as generation, the label a verbaliser word
  (sentiment -> "positive"/"negative", topic -> "sports"/"food"/"weather"/"music").
`mix` draws every row from one of the three families at random (multi-task).

Every prompt has one correct answer but several phrasings of it, drawn with
fixed probabilities, so a teacher's top-k distribution carries information
beyond its top token; exact match (the response is one of the acceptable
phrasings) and ROUGE-L (against the closest phrasing) stay meaningful.

Held-out means unseen: the prompt space is partitioned by a hash of the
normalised prompt text (`tasks.textnorm.normalise_prompt`, salted with the seed);
one part in `EVAL_PARTS` is reserved for validation and test, the rest for
training. An evaluation prompt therefore never occurs among the training prompts,
while the facts it asks about (a word's opposite, a noun's plural) are taught
through the other templates and combinations.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.textnorm import normalise_prompt

SPLITS = ("train", "validation", "test")
FAMILIES = ("qa", "transform", "classify")
TASKS = (*FAMILIES, "mix")
DEFAULT_SIZES = {"train": 6000, "validation": 200, "test": 300}
EVAL_PARTS = 5  # one prompt in five (by hash) is reserved for evaluation

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

# transform
_SHORT_WORDS = (
    "red fox cat dog sun moon tree bird blue green fish star rain wind king ship "
    "cake road lake bell door milk gold hill rose sand wolf leaf"
).split()

_PLURALS = {
    "cat": "cats", "dog": "dogs", "tree": "trees", "bird": "birds", "star": "stars", "ship": "ships", "cake": "cakes",
    "road": "roads", "lake": "lakes", "bell": "bells", "door": "doors", "hill": "hills", "rose": "roses",
    "box": "boxes", "fox": "foxes", "bus": "buses", "dish": "dishes", "church": "churches", "glass": "glasses",
    "city": "cities", "baby": "babies", "berry": "berries", "story": "stories", "party": "parties",
    "wolf": "wolves", "leaf": "leaves", "knife": "knives", "wife": "wives",
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "goose": "geese",
}

# classify
_SUBJECTS = ["the movie", "the food", "my day", "the concert", "the hotel", "the game", "our trip", "the book"]
_VERBS = ["was", "felt", "seemed", "looked"]
_SENTIMENT = {
    "positive": ["wonderful", "great", "lovely", "excellent", "fun", "amazing", "pleasant", "superb", "delightful", "nice"],
    "negative": ["awful", "terrible", "boring", "horrible", "dull", "bad", "poor", "dreadful", "unpleasant", "sad"],
}
_TOPICS = {
    "sports": (["the striker", "the coach", "the team", "the goalie", "the runner"],
               ["scored a goal", "won the match", "lost the final", "trained all week", "broke the record"]),
    "food": (["the chef", "my aunt", "the baker", "the waiter", "the cook"],
             ["baked fresh bread", "made a spicy soup", "served the pasta", "burned the rice", "sliced the cheese"]),
    "weather": (["the sky", "the wind", "the storm", "the morning", "the forecast"],
                ["turned grey and rainy", "brought heavy snow", "was sunny and warm", "blew from the north", "promised thunder"]),
    "music": (["the band", "the singer", "the drummer", "the choir", "the pianist"],
              ["played a new song", "hit the high note", "kept the rhythm", "sang in harmony", "tuned the guitar"]),
}


@dataclass(frozen=True)
class Example:
    id: str
    task: str                # the kind of question (add, plural, sentiment, ...)
    prompt: str
    response: str            # one phrasing, drawn like the training data's
    references: list[str]    # every acceptable phrasing; the first is canonical
    family: str = "qa"       # qa | transform | classify


Draw = tuple[str, str, list[str]]  # kind, prompt, acceptable forms


def _qa(rng: random.Random) -> Draw:
    kind = rng.choice(("add", "bigger", "opposite", "color", "next", "count"))
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        prompt = rng.choice(("What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.")).format(a=a, b=b)
        return kind, prompt, [f"{a + b}", f"The answer is {a + b}.", f"{a} plus {b} is {a + b}."]
    if kind == "bigger":
        a, b = rng.sample(range(10), 2)
        prompt = rng.choice(("Which is bigger, {a} or {b}?", "Which number is larger: {a} or {b}?",
                             "Pick the bigger number: {a} or {b}.")).format(a=a, b=b)
        return kind, prompt, [f"{max(a, b)}", f"{max(a, b)} is bigger.", f"The bigger one is {max(a, b)}."]
    if kind == "opposite":
        word, opp = rng.choice(list(_OPPOSITES.items()))
        if rng.random() < 0.5:
            word, opp = opp, word
        prompt = rng.choice(("What is the opposite of {w}?", "Give the opposite of {w}.",
                             "What word means the opposite of {w}?")).format(w=word)
        return kind, prompt, [opp, f"The opposite of {word} is {opp}."]
    if kind == "color":
        thing, color = rng.choice(list(_COLORS.items()))
        prompt = rng.choice(("What color is {t}?", "What is the color of {t}?", "Name the color of {t}.")).format(t=thing)
        return kind, prompt, [color, f"{thing.capitalize()} is {color}.", f"It is {color}."]
    if kind == "next":
        n = rng.randint(0, 49)
        prompt = rng.choice(("What number comes after {n}?", "What comes after {n}?", "Which number follows {n}?")).format(n=n)
        return kind, prompt, [f"{n + 1}", f"After {n} comes {n + 1}."]
    words = rng.sample(_WORDS, rng.randint(1, 5))
    text = " ".join(words)
    prompt = rng.choice(("How many words are in: {s}?", "Count the words in: {s}.")).format(s=text)
    return "count", prompt, [f"{len(words)}", f"There are {len(words)} words."]


def _transform(rng: random.Random) -> Draw:
    kind = rng.choice(("upper", "plural", "reverse", "last"))
    if kind == "upper":
        text = " ".join(rng.sample(_SHORT_WORDS, rng.randint(1, 2)))
        prompt = rng.choice(("Uppercase: {s}", "Write in capitals: {s}", "Make this uppercase: {s}")).format(s=text)
        return kind, prompt, [text.upper(), f"In capitals: {text.upper()}."]
    if kind == "plural":
        noun, plural = rng.choice(list(_PLURALS.items()))
        prompt = rng.choice(("Plural of {n}?", "What is the plural of {n}?", "Give the plural of {n}.")).format(n=noun)
        return kind, prompt, [plural, f"The plural of {noun} is {plural}.", f"One {noun}, two {plural}."]
    words = rng.sample(_SHORT_WORDS, rng.randint(2, 3))
    text = " ".join(words)
    if kind == "reverse":
        prompt = rng.choice(("Reverse the words: {s}", "Say these words backwards: {s}",
                             "Put in reverse order: {s}")).format(s=text)
        rev = " ".join(reversed(words))
        return kind, prompt, [rev, f"Reversed: {rev}."]
    prompt = rng.choice(("What is the last word of: {s}?", "Last word of: {s}", "Which word comes last: {s}?")).format(s=text)
    return kind, prompt, [words[-1], f"The last word is {words[-1]}."]


def _classify(rng: random.Random) -> Draw:
    if rng.random() < 0.5:
        label = rng.choice(tuple(_SENTIMENT))
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_SENTIMENT[label])}"
        prompt = rng.choice(("Sentiment of: {s}.", "Is this positive or negative? {s}.",
                             "Classify the sentiment: {s}.")).format(s=sentence.capitalize())
        return "sentiment", prompt, [label, f"The sentiment is {label}.", f"It is {label}."]
    label = rng.choice(tuple(_TOPICS))
    subjects, predicates = _TOPICS[label]
    sentence = f"{rng.choice(subjects)} {rng.choice(predicates)}"
    prompt = rng.choice(("Topic of: {s}.", "What is this about? {s}.", "Classify the topic: {s}.")).format(s=sentence.capitalize())
    return "topic", prompt, [label, f"The topic is {label}.", f"It is about {label}."]


_FAMILY_DRAW: dict[str, Callable[[random.Random], Draw]] = {"qa": _qa, "transform": _transform, "classify": _classify}


def is_eval_prompt(prompt: str, seed: int = 0) -> bool:
    """Whether a prompt lies in the evaluation part of the prompt space (a hash of its normalised text)."""
    digest = hashlib.sha256(f"{seed}:{normalise_prompt(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % EVAL_PARTS == 0


def _phrase(rng: random.Random, forms: list[str], weights: tuple[float, ...]) -> str:
    return rng.choices(forms, weights=weights[: len(forms)], k=1)[0]


def _make(rng: random.Random, index: int, family: str, evaluation: bool, seed: int) -> Example:
    for _ in range(10_000):
        kind, prompt, forms = _FAMILY_DRAW[family](rng)
        if is_eval_prompt(prompt, seed) == evaluation:
            response = _phrase(rng, forms, (0.5, 0.3, 0.2))
            return Example(id=f"demo-{index:06d}", task=kind, prompt=prompt, response=response, references=forms, family=family)
    raise RuntimeError(f"demo task {family}: no {'evaluation' if evaluation else 'training'} prompt drawn")  # unreachable in practice


def generate(seed: int = 0, sizes: dict[str, int] | None = None, task: str = "qa") -> dict[str, list[Example]]:
    """Return the splits; the same (seed, task) always gives the same examples.

    Training prompts come from the training part of the prompt space, validation
    and test prompts from the evaluation part: no evaluation prompt equals a
    training prompt after `normalise_prompt`.
    """
    if task not in TASKS:
        raise ValueError(f"demo task {task!r} is not one of {TASKS}")
    sizes = sizes or DEFAULT_SIZES
    rng = random.Random(f"{task}:{seed}" if task != "qa" else seed)
    index = 0
    splits: dict[str, list[Example]] = {}
    for split in SPLITS:
        rows = []
        for _ in range(sizes[split]):
            family = rng.choice(FAMILIES) if task == "mix" else task
            rows.append(_make(rng, index, family, split != "train", seed))
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
