"""Knowledge-conflict tasks: real facts a pretrained base already answers correctly.

The invented world of `world_facts` is learned from the corpus, so its wrong values are
merely unlearnable. These tasks ask about facts the base model already knows (capitals,
one-digit arithmetic, unit conversions): a `wrong_value` corruption of them *contradicts*
what the model knows — the misleading negative tokens the paper describes. Which facts count
as known is decided by the base model's own greedy answers, checked once by
scripts/check_known_facts.py and stored in known_facts.json beside this file; the tasks draw
only from that list (the candidates are listed below, so the check is reproducible).

Training rows and held-out questions ask the same facts with different phrasings: a test
question checks whether a fact the model knew survives fine-tuning on noisy rows, never
whether it can recall a question it saw.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from orchestrator.data.synthetic_tasks import Problem, _distinct, _explained, _sentence

KNOWN_FACTS_FILE = Path(__file__).with_name("known_facts.json")

CAPITAL_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("England", "London"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("India", "New Delhi"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"),
    ("Kenya", "Nairobi"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
    ("Vietnam", "Hanoi"), ("Chile", "Santiago"), ("Switzerland", "Bern"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"),
    ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Malaysia", "Kuala Lumpur"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Scotland", "Edinburgh"),
    ("Iceland", "Reykjavik"), ("Afghanistan", "Kabul"), ("Syria", "Damascus"),
)
# unit -> (per unit, of what): "How many {small} are in {n} {big}?" -> n * factor
UNIT_CANDIDATES: dict[str, tuple[str, str, int]] = {
    "m_cm": ("meters", "centimeters", 100),
    "km_m": ("kilometers", "meters", 1000),
    "kg_g": ("kilograms", "grams", 1000),
    "h_min": ("hours", "minutes", 60),
    "min_s": ("minutes", "seconds", 60),
    "week_day": ("weeks", "days", 7),
    "year_month": ("years", "months", 12),
    "day_h": ("days", "hours", 24),
    "dozen": ("dozens", "items", 12),
}
UNIT_COUNTS = range(1, 10)
ARITH_OPERANDS = range(1, 10)  # one-digit sums and products

# (train phrasings, held-out phrasings): 10 training phrasings (the clean validation rows
# take up to num_eval of the training questions away from training) and 8 held-out ones, so that the few known facts (60 for
# SmolLM2-135M) give 480 distinct held-out questions: 200 + 200 test questions fit, each fact
# asked about 3 times per set in different words (the sets' effective size is the facts').
_CAPITAL_QS = (["What is the capital of {c}?", "Name the capital city of {c}.",
                "Tell me the capital of {c}.", "What is the capital city of {c}?",
                "Name the capital of {c}.", "Which city is {c}'s capital?",
                "What's the capital of {c}?", "Capital of {c}?",
                "Tell me the capital city of {c}.", "I need the capital of {c}."],
               ["Which city is the capital of {c}?", "{c} has which city as its capital?",
                "What city serves as the capital of {c}?", "The capital of {c} is which city?",
                "Where is the seat of government of {c}?", "Which is the capital city of {c}?",
                "In which city is the capital of {c}?", "What is {c}'s capital?"])
_UNIT_QS = (["How many {small} are in {n} {big}?", "Convert {n} {big} to {small}.",
             "How many {small} make {n} {big}?", "How many {small} are there in {n} {big}?",
             "Convert {n} {big} into {small}.", "{n} {big} to {small}?",
             "Change {n} {big} to {small}.", "How many {small} in {n} {big}?",
             "Please convert {n} {big} to {small}.", "What do {n} {big} make in {small}?"],
            ["{n} {big} equal how many {small}?", "Express {n} {big} in {small}.",
             "What is {n} {big} in {small}?", "If you have {n} {big}, how many {small} is that?",
             "Turn {n} {big} into {small}.", "How many {small} is {n} {big}?",
             "Give {n} {big} in {small}.", "{n} {big} is how many {small}?"])
_ARITH_QS = (["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.",
              "What's {a} {op} {b}?", "Solve {a} {op} {b}.", "{a} {op} {b} = ?",
              "Please compute {a} {op} {b}.", "Tell me {a} {op} {b}.",
              "What is the value of {a} {op} {b}?", "Quick: {a} {op} {b}?"],
             ["How much is {a} {op} {b}?", "Give the value of {a} {op} {b}.",
              "What does {a} {op} {b} equal?", "Work out {a} {op} {b}.",
              "Evaluate {a} {op} {b}.", "What is the result of {a} {op} {b}?",
              "Find {a} {op} {b}.", "{a} {op} {b} equals what?"])


def capital_facts() -> list[tuple[str, str]]:
    return list(CAPITAL_CANDIDATES)


def unit_facts() -> list[tuple[str, int, int]]:
    return [(unit, n, n * UNIT_CANDIDATES[unit][2]) for unit in UNIT_CANDIDATES for n in UNIT_COUNTS]


def arithmetic_facts() -> list[tuple[int, str, int, int]]:
    out = []
    for a in ARITH_OPERANDS:
        for b in ARITH_OPERANDS:
            out += [(a, "+", b, a + b), (a, "*", b, a * b)]
    return out


_PHRASINGS = {"capitals": _CAPITAL_QS, "unit_conversions": _UNIT_QS, "known_arithmetic": _ARITH_QS}


def phrasings(task: str, held_out: bool) -> list[str]:
    if task not in _PHRASINGS:
        raise ValueError(f"unknown knowledge task {task!r}")
    return _PHRASINGS[task][held_out]


def fact_question(task: str, fact: tuple[Any, ...], held_out: bool, pick: int = 0) -> str:
    """A question about `fact` in its `pick`-th training (held_out False) or held-out phrasing."""
    template = phrasings(task, held_out)[pick]
    if task == "capitals":
        return template.format(c=fact[0])
    if task == "unit_conversions":
        big, small, _ = UNIT_CANDIDATES[fact[0]]
        return template.format(n=fact[1], big=big, small=small)
    return template.format(a=fact[0], op=fact[1], b=fact[2])


def fact_answer(task: str, fact: tuple[Any, ...]) -> str:
    return str(fact[-1])


CANDIDATES = {"capitals": capital_facts, "unit_conversions": unit_facts,
              "known_arithmetic": arithmetic_facts}


@lru_cache(maxsize=1)
def known_facts() -> dict[str, list[tuple[Any, ...]]]:
    """The candidates the base model answered correctly (known_facts.json); a task the file
    does not list is an error: the check has to run before its corpus can be generated."""
    if not KNOWN_FACTS_FILE.is_file():
        raise FileNotFoundError(f"{KNOWN_FACTS_FILE} is missing: run scripts/check_known_facts.py")
    saved = json.loads(KNOWN_FACTS_FILE.read_text())["facts"]
    out = {}
    for task, make in CANDIDATES.items():
        allowed = {tuple(f) for f in make()}
        facts = [tuple(f) for f in saved.get(task, [])]
        unknown = [f for f in facts if f not in allowed]
        if unknown:
            raise ValueError(f"{KNOWN_FACTS_FILE}: {task} lists facts that are not candidates: {unknown[:3]}")
        out[task] = facts
    return out


def _problem(task: str, rng: random.Random, held_out: bool) -> Problem:
    facts = known_facts()[task]
    if len(facts) < 4:  # e.g. unit_conversions: SmolLM2-135M answered none of them
        raise ValueError(f"data.synthetic.tasks: {task} has {len(facts)} facts the base model "
                         f"knows ({KNOWN_FACTS_FILE.name}); at least 4 are needed (an answer "
                         "and three distractors)")
    fact = rng.choice(facts)
    question = fact_question(task, fact, held_out, rng.randrange(len(phrasings(task, held_out))))
    value = fact_answer(task, fact)
    if task == "capitals":
        sentence = f"The capital of {fact[0]} is {{v}}."
        others = [f[1] for f in facts]
    elif task == "unit_conversions":
        big, small, _ = UNIT_CANDIDATES[fact[0]]
        sentence = f"{fact[1]} {big} are {{v}} {small}."
        # near misses: the other factors' results and off-by-one counts of the same unit
        others = [str(fact[2] + d) for d in (-1, 1, 2, -2)] + [str(f[2]) for f in facts if f[0] == fact[0]]
    else:
        sentence = f"{fact[0]} {fact[1]} {fact[2]} = {{v}}."
        v = int(value)
        others = [str(v + d) for d in (-2, -1, 1, 2, 10)]
    others = [o for o in others if o != value]
    rng.shuffle(others)
    return Problem(task, question, _explained(_sentence(sentence)), value, _distinct(value, others))


def capitals(rng: random.Random, held_out: bool) -> Problem:
    return _problem("capitals", rng, held_out)


def unit_conversions(rng: random.Random, held_out: bool) -> Problem:
    return _problem("unit_conversions", rng, held_out)


def known_arithmetic(rng: random.Random, held_out: bool) -> Problem:
    return _problem("known_arithmetic", rng, held_out)


KNOWLEDGE_TASKS = {"capitals": capitals, "unit_conversions": unit_conversions,
                   "known_arithmetic": known_arithmetic}
