"""Task families of the synthetic corpus: questions with checkable answers.

Each draw returns a `Problem`: the question, the response as segments in which the answer
value's slots are marked (so a wrong value can be substituted and its character spans
known exactly), the answer string and at least three distinct plausible wrong values
(used both for wrong_value noise and as multiple-choice distractors).

world_facts draws from a fixed invented world (same for every seed, so that facts are
consistent across splits and runs); its eval questions use phrasings that never occur in
training rows, so an eval question tests a fact learned from differently worded rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

Segment = tuple[str, bool]  # (text, is_answer_slot); slot text is ignored at render time
WORLD_SEED = 20_260_804
NUM_ENTITIES = 50


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    segments: tuple[Segment, ...]
    answer: str
    wrong_values: tuple[str, ...]


def render(problem: Problem, value: str) -> tuple[str, list[tuple[int, int]]]:
    """Response text with `value` in every answer slot, and the char spans of those slots."""
    parts, spans, pos = [], [], 0
    for text, is_slot in problem.segments:
        piece = value if is_slot else text
        if is_slot:
            spans.append((pos, pos + len(piece)))
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans


def _explained(explanation: list[Segment]) -> tuple[Segment, ...]:
    """Every response ends with the checkable sentence 'The answer is X.'."""
    return (*explanation, (" The answer is ", False), ("", True), (".", False))


def _sentence(template: str) -> list[Segment]:
    """'The capital of X is {v}.' -> segments with the answer slot where {v} stands."""
    head, tail = template.split("{v}")
    return [(head, False), ("", True), (tail, False)]


def _distinct(correct: str, candidates: list[str], k: int = 3) -> tuple[str, ...]:
    out: list[str] = []
    for c in candidates:
        if c != correct and c not in out:
            out.append(c)
    if len(out) < k:
        raise AssertionError(f"only {len(out)} distractors for answer {correct!r}")
    return tuple(out)


# ----------------------------------------------------------------------------- arithmetic


def arithmetic(rng: random.Random, held_out: bool) -> Problem:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 19), rng.randint(2, 19)
        value = a * b
    else:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        value = a + b if op == "+" else a - b
    expr = f"{a} {op} {b}"
    question = rng.choice([f"What is {expr}?", f"Compute {expr}.", f"Calculate {expr}."])
    deltas = rng.sample([-10, -2, -1, 1, 2, 10], 6)
    wrong = [str(value + d) for d in deltas]
    segments = _explained(_sentence(f"{expr} = {{v}}."))
    return Problem("arithmetic", question, segments, str(value), _distinct(str(value), wrong))


# ----------------------------------------------------------------------------- world facts

_SYLLABLES = "vel mor dra ka lin tho ser ul bren qua zit ar om nev ri sal tor fen ga ly".split()
_COLOURS = "crimson teal amber violet indigo ochre silver olive scarlet ivory azure jade".split()
_ANIMALS = "lynx heron otter falcon badger stag tortoise raven ibex marten crane viper".split()

# attribute -> (train phrasings, held-out eval phrasings, explanation), {e} = entity name
_FACT_TEMPLATES: dict[str, tuple[list[str], list[str], str]] = {
    "capital": (["What is the capital of {e}?", "Name the capital city of {e}."],
                ["Which city is the capital of {e}?"], "The capital of {e} is {v}."),
    "colour": (["What colour is the banner of {e}?", "Which colour does {e} fly on its banner?"],
               ["The banner of {e} has which colour?"], "The banner of {e} is {v}."),
    "age": (["How many years ago was {e} founded?", "How old is {e}, in years?"],
            ["{e} was founded how many years ago?"], "{e} was founded {v} years ago."),
    "animal": (["What is the national animal of {e}?", "Which animal is the emblem of {e}?"],
               ["Name the national animal of {e}."], "The national animal of {e} is the {v}."),
    "language": (["What language do people speak in {e}?", "Which language is spoken in {e}?"],
                 ["In {e}, people speak which language?"], "The people of {e} speak {v}."),
}


def _invented_name(rng: random.Random, used: set[str], syllables: tuple[int, int]) -> str:
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(*syllables))).capitalize()
        if name not in used and len(name) >= 4:
            used.add(name)
            return name


@lru_cache(maxsize=1)
def world() -> tuple[dict[str, str], ...]:
    """The fixed invented world: NUM_ENTITIES realms with five attributes each."""
    rng = random.Random(WORLD_SEED)
    used: set[str] = set()
    languages = [_invented_name(rng, used, (2, 2)) + "ic" for _ in range(10)]
    realms = []
    for _ in range(NUM_ENTITIES):
        realms.append({
            "name": _invented_name(rng, used, (2, 3)),
            "capital": _invented_name(rng, used, (2, 3)),
            "colour": rng.choice(_COLOURS),
            "age": str(rng.randint(40, 990)),
            "animal": rng.choice(_ANIMALS),
            "language": rng.choice(languages),
        })
    return tuple(realms)


def world_facts(rng: random.Random, held_out: bool) -> Problem:
    realms = world()
    realm = rng.choice(realms)
    attr = rng.choice(sorted(_FACT_TEMPLATES))
    train_qs, eval_qs, sentence = _FACT_TEMPLATES[attr]
    question = rng.choice(eval_qs if held_out else train_qs).format(e=realm["name"])
    value = realm[attr]
    others = [r[attr] for r in realms if r[attr] != value]
    rng.shuffle(others)
    segments = _explained(_sentence(sentence.replace("{e}", realm["name"])))
    return Problem("world_facts", question, segments, value, _distinct(value, others))


# ----------------------------------------------------------------------------- list ops


def _fmt_list(xs: list[int]) -> str:
    return "[" + ", ".join(str(x) for x in xs) + "]"


def _adjacent_swaps(xs: list[int]) -> list[str]:
    out = []
    for i in range(len(xs) - 1):
        ys = list(xs)
        ys[i], ys[i + 1] = ys[i + 1], ys[i]
        out.append(_fmt_list(ys))
    return out


def list_ops(rng: random.Random, held_out: bool) -> Problem:
    xs = rng.sample(range(1, 100), rng.randint(4, 6))  # distinct values: distractors differ
    shown = _fmt_list(xs)
    op = rng.choice(["sort", "reverse", "max", "min"])
    if op in ("sort", "reverse"):
        result = sorted(xs) if op == "sort" else xs[::-1]
        value = _fmt_list(result)
        wrong = _adjacent_swaps(result)
        question = (f"Sort the list {shown} in ascending order." if op == "sort"
                    else f"Reverse the list {shown}.")
        sentence = (f"Sorting {shown} in ascending order gives {{v}}." if op == "sort"
                    else f"Reversing {shown} gives {{v}}.")
    else:
        pick = max(xs) if op == "max" else min(xs)
        value = str(pick)
        wrong = [str(x) for x in xs if x != pick]
        word = "largest" if op == "max" else "smallest"
        question = f"What is the {word} number in {shown}?"
        sentence = f"The {word} number in {shown} is {{v}}."
    rng.shuffle(wrong)
    segments = _explained(_sentence(sentence))
    return Problem("list_ops", question, segments, value, _distinct(value, wrong))


# ----------------------------------------------------------------------------- string ops


def _made_up_word(rng: random.Random) -> str:
    while True:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
        if len(word) >= 5 and len(set(word)) >= 4:
            return word


def _string_variants(s: str, rng: random.Random) -> list[str]:
    """Near misses of s: adjacent swaps of differing letters, then single-letter changes."""
    out = []
    for i in range(len(s) - 1):
        if s[i] != s[i + 1]:
            out.append(s[:i] + s[i + 1] + s[i] + s[i + 2:])
    rng.shuffle(out)
    for i in range(len(s)):
        out.append(s[:i] + ("a" if s[i] != "a" else "e") + s[i + 1:])
    return out


def string_ops(rng: random.Random, held_out: bool) -> Problem:
    word = _made_up_word(rng)
    op = rng.choice(["reverse", "upper", "count", "length"])
    if op == "reverse":
        value = word[::-1]
        question = f"Reverse the letters of the word '{word}'."
        sentence = f"Reading '{word}' backwards gives {{v}}."
        wrong = _string_variants(value, rng)
    elif op == "upper":
        value = word.upper()
        question = f"Write the word '{word}' in uppercase."
        sentence = f"In uppercase, '{word}' is {{v}}."
        positions = rng.sample(range(len(value)), len(value))
        wrong = [value[:i] + value[i].lower() + value[i + 1:] for i in positions]
    elif op == "count":
        letter = rng.choice(sorted(set(word)))
        count = word.count(letter)
        value = str(count)
        question = f"How many times does the letter '{letter}' appear in '{word}'?"
        sentence = f"The letter '{letter}' appears {{v}} times in '{word}'."
        wrong = [str(c) for c in (count + 1, count - 1, count + 2, count + 3)]
    else:
        value = str(len(word))
        question = f"How many letters does the word '{word}' have?"
        sentence = f"The word '{word}' has {{v}} letters."
        wrong = [str(len(word) + d) for d in (1, -1, 2, -2)]
    segments = _explained(_sentence(sentence))
    return Problem("string_ops", question, segments, value, _distinct(value, wrong))


TASKS = {
    "arithmetic": arithmetic,
    "world_facts": world_facts,
    "list_ops": list_ops,
    "string_ops": string_ops,
}
