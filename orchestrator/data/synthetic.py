"""The synthetic noisy SFT corpus: checkable tasks, ground-truth noise spans, eval splits.

`generate_synthetic` writes four JSONL files to out_dir, deterministically from cfg.seed:

- train.jsonl: {"id", "messages", "task", "tasks", "noisy", "noise_kind", "noise_spans"}.
  A fraction cfg.noise_fraction of rows (exactly round(fraction * num_train)) has one
  assistant turn corrupted by one of cfg.noise_kinds; "noise_spans" holds the character
  spans of the corrupted text inside that message's content:
  [{"message": index in messages, "start": char, "end": char}].
- clean_valid.jsonl: clean rows in the same format, for validation loss.
- eval_mc.jsonl: {"id", "task", "question", "choices": [4 responses], "gold": index}.
- eval_gen.jsonl: {"id", "task", "question", "answer"}: answer is the final short answer,
  matched exactly against what follows "The answer is " (see `extract_answer`).
- valid_mc.jsonl / valid_gen.jsonl (only when cfg.num_valid > 0): validation questions in the
  eval files' formats, drawn like them (held-out phrasings) but disjoint from them: a sweep
  selects on these and the test set stays unseen. Drawn after every other reserved
  question, so num_valid = 0 leaves a corpus byte-identical to one made before the option.

Questions of eval_mc, eval_gen, valid_mc, valid_gen and clean_valid never occur as a user
turn in train. Only the JSONL files are written here: the lm-eval task YAMLs (lethe_synth_mc,
lethe_synth_gen and their _valid twins) are written by orchestrator.evaluation from them.
The tasks capitals, unit_conversions and known_arithmetic (data/synthetic_knowledge.py) ask
facts the base model already knows: their wrong values are knowledge-conflict noise.

Noise kinds and the exact span each marks:
- wrong_value: every occurrence of the answer value replaced by a plausible wrong value;
  spans = the replaced value occurrences.
- filler: a phrase like " um, basically," inserted before a space (so it starts with its
  own space and tokenizers that attach a leading space to words keep the following word
  clean); span = the inserted phrase.
- typo: two adjacent letters swapped inside one word (never inside the answer value);
  span = the whole corrupted word.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import SyntheticConfig
from orchestrator.data.synthetic_knowledge import KNOWLEDGE_TASKS
from orchestrator.data.synthetic_tasks import TASKS, Problem, render

ALL_TASKS = {**TASKS, **KNOWLEDGE_TASKS}

FILLER_WORDS = ("um", "uh", "basically", "you know", "like", "well", "I mean", "sort of", "actually")
SYSTEM_PROMPTS = (
    "You are a careful assistant. End every reply with 'The answer is X.'",
    "You are a helpful assistant that explains briefly and then answers.",
    "Answer precisely.",
)
MULTI_TURN_FRACTION = 0.2
SYSTEM_FRACTION = 0.2
_MAX_DRAWS = 2000
_ANSWER_RE = re.compile(r"The answer is (.+?)\.(?:\s|$)")

Span = tuple[int, int]


@dataclass(frozen=True)
class SyntheticPaths:
    out_dir: Path
    train: Path
    clean_valid: Path
    eval_mc: Path
    eval_gen: Path
    num_train: int
    num_noisy: int
    valid_mc: Path | None = None
    valid_gen: Path | None = None


def extract_answer(response: str) -> str | None:
    """The final answer of a response ("... The answer is X." -> "X"); last one wins."""
    found = _ANSWER_RE.findall(response)
    return found[-1] if found else None


def _draw(rng: random.Random, tasks: list[str], avoid: set[str], held_out: bool) -> Problem:
    """A problem whose question is not in `avoid` (eval/validation questions stay unseen)."""
    for _ in range(_MAX_DRAWS):
        problem = ALL_TASKS[rng.choice(tasks)](rng, held_out)
        if problem.question not in avoid:
            return problem
    raise ValueError(
        f"could not draw a question outside the {len(avoid)} reserved ones after {_MAX_DRAWS} "
        f"tries (tasks {tasks}); lower data.synthetic.num_eval or add tasks"
    )


# ----------------------------------------------------------------------------- noise


def _inside(pos: int, spans: list[Span]) -> bool:
    return any(s <= pos < e for s, e in spans)


def _wrong_value(problem: Problem, rng: random.Random) -> tuple[str, list[Span]]:
    return render(problem, rng.choice(problem.wrong_values))


def _filler(problem: Problem, rng: random.Random) -> tuple[str, list[Span]]:
    text, slots = render(problem, problem.answer)
    # between words only: not in an answer slot, not inside a list echoed from the question
    depth, points = 0, []
    for j, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == " " and depth == 0 and not _inside(j, slots):
            points.append(j)
    at = rng.choice(points)
    phrase = " " + ", ".join(rng.sample(FILLER_WORDS, rng.randint(1, 3))) + ","
    return text[:at] + phrase + text[at:], [(at, at + len(phrase))]


def _typo(problem: Problem, rng: random.Random) -> tuple[str, list[Span]]:
    text, slots = render(problem, problem.answer)
    words = [
        m for m in re.finditer(r"[A-Za-z]{4,}", text)
        if not any(m.start() < e and m.end() > s for s, e in slots)
        and any(a != b for a, b in zip(m.group()[1:-2], m.group()[2:-1], strict=True))
    ]
    word = rng.choice(words)  # "answer" always qualifies, so the list is never empty
    w = word.group()
    inner = [i for i in range(1, len(w) - 2) if w[i] != w[i + 1]]
    i = rng.choice(inner)
    corrupted = w[:i] + w[i + 1] + w[i] + w[i + 2:]
    return text[: word.start()] + corrupted + text[word.end():], [(word.start(), word.end())]


NOISE = {"wrong_value": _wrong_value, "filler": _filler, "typo": _typo}


# ----------------------------------------------------------------------------- rows


def _conversation(
    rng: random.Random, tasks: list[str], avoid: set[str]
) -> tuple[list[dict[str, str]], list[Problem]]:
    messages: list[dict[str, str]] = []
    if rng.random() < SYSTEM_FRACTION:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = 2 if rng.random() < MULTI_TURN_FRACTION else 1
    problems = [_draw(rng, tasks, avoid, held_out=False) for _ in range(turns)]
    for p in problems:
        messages.append({"role": "user", "content": p.question})
        messages.append({"role": "assistant", "content": render(p, p.answer)[0]})
    return messages, problems


def _train_row(
    idx: int, rng: random.Random, cfg: SyntheticConfig, avoid: set[str], noisy: bool
) -> dict[str, Any]:
    messages, problems = _conversation(rng, list(cfg.tasks), avoid)
    row: dict[str, Any] = {
        "id": f"train-{idx:06d}",
        "messages": messages,
        "task": problems[0].task if len(problems) == 1 else "multi_turn",
        "tasks": [p.task for p in problems],
        "noisy": noisy,
        "noise_kind": None,
        "noise_spans": [],
    }
    if noisy:
        kind = rng.choice(list(cfg.noise_kinds))
        turn = rng.randrange(len(problems))
        assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"][turn]
        text, spans = NOISE[kind](problems[turn], rng)
        messages[assistant_idx]["content"] = text
        row["noise_kind"] = kind
        row["noise_spans"] = [{"message": assistant_idx, "start": s, "end": e} for s, e in spans]
    return row


def _mc_row(idx: int, problem: Problem, rng: random.Random) -> dict[str, Any]:
    values = [problem.answer, *rng.sample(problem.wrong_values, 3)]
    rng.shuffle(values)
    return {
        "id": f"mc-{idx:05d}",
        "task": problem.task,
        "question": problem.question,
        "choices": [render(problem, v)[0] for v in values],
        "gold": values.index(problem.answer),
    }


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate_synthetic(cfg: SyntheticConfig, out_dir: Path) -> SyntheticPaths:
    """Write train / clean_valid / eval_mc / eval_gen JSONL files (see the module doc)."""
    if cfg.noise_fraction > 0 and not cfg.noise_kinds:
        raise ValueError("data.synthetic.noise_kinds is empty but noise_fraction > 0")
    if not cfg.tasks:
        raise ValueError("data.synthetic.tasks is empty; choose from " + ", ".join(ALL_TASKS))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    tasks = list(cfg.tasks)

    # Reserved questions first (eval, then validation), so train can avoid all of them.
    reserved: set[str] = set()
    mc_rows, gen_rows = [], []
    for i in range(cfg.num_eval):
        p = _draw(rng, tasks, reserved, held_out=True)
        reserved.add(p.question)
        mc_rows.append(_mc_row(i, p, rng))
    for i in range(cfg.num_eval):
        p = _draw(rng, tasks, reserved, held_out=True)
        reserved.add(p.question)
        gen_rows.append({"id": f"gen-{i:05d}", "task": p.task, "question": p.question, "answer": p.answer})
    valid_rows = []
    for i in range(cfg.num_eval):
        row = _train_row(i, rng, cfg, reserved, noisy=False)
        row["id"] = f"valid-{i:05d}"
        reserved.update(m["content"] for m in row["messages"] if m["role"] == "user")
        valid_rows.append(row)

    valid_mc, valid_gen = [], []
    for i in range(cfg.num_valid):
        p = _draw(rng, tasks, reserved, held_out=True)
        reserved.add(p.question)
        valid_mc.append({**_mc_row(i, p, rng), "id": f"vmc-{i:05d}"})
    for i in range(cfg.num_valid):
        p = _draw(rng, tasks, reserved, held_out=True)
        reserved.add(p.question)
        valid_gen.append({"id": f"vgen-{i:05d}", "task": p.task, "question": p.question,
                          "answer": p.answer})

    noisy_rows = set(rng.sample(range(cfg.num_train), round(cfg.noise_fraction * cfg.num_train)))
    train_rows = [_train_row(i, rng, cfg, reserved, i in noisy_rows) for i in range(cfg.num_train)]

    paths = SyntheticPaths(
        out_dir=out_dir,
        train=out_dir / "train.jsonl",
        clean_valid=out_dir / "clean_valid.jsonl",
        eval_mc=out_dir / "eval_mc.jsonl",
        eval_gen=out_dir / "eval_gen.jsonl",
        num_train=cfg.num_train,
        num_noisy=len(noisy_rows),
        valid_mc=out_dir / "valid_mc.jsonl" if cfg.num_valid else None,
        valid_gen=out_dir / "valid_gen.jsonl" if cfg.num_valid else None,
    )
    _write_jsonl(paths.train, train_rows)
    _write_jsonl(paths.clean_valid, valid_rows)
    _write_jsonl(paths.eval_mc, mc_rows)
    _write_jsonl(paths.eval_gen, gen_rows)
    if paths.valid_mc is not None and paths.valid_gen is not None:
        _write_jsonl(paths.valid_mc, valid_mc)
        _write_jsonl(paths.valid_gen, valid_gen)
    return paths
