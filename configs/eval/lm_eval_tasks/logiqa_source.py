"""LogiQA's source text files -> the rows EleutherAI/logiqa's loading script yielded, and
lm-eval's prompt for them (see logiqa.yaml beside this file).

The source files (github.com/lgw863/LogiQA-dataset: Train.txt, Eval.txt, Test.txt) hold one
question per blank-line separated block of seven lines: the gold letter (a-d), the passage,
the question, then four options written "A.text" .. "D.text". The script (lm-eval v0.3's
lm_eval/datasets/logiqa/logiqa.py, uploaded as EleutherAI/logiqa) kept the letter, and put a
space after every full stop of the other lines before stripping them (the files run
sentences together: "park.These"); options lose their "A." prefix first. Nothing else was
changed, so nothing else is changed here: every prompt matches the one lm-eval built from
the script's rows.
"""

from __future__ import annotations

from typing import Any

LETTERS = "abcd"


def _spaced(line: str) -> str:
    """A line as the script stored it: a space after each "." (decimals too), ends stripped."""
    return line.replace(".", ". ").strip()


def parse_block(block: str) -> dict[str, Any]:
    """One question block of a source file -> {label, context, question, options}."""
    lines = block.split("\n")
    return {
        "label": lines[0].strip(),
        "context": _spaced(lines[1]),
        "question": _spaced(lines[2]),
        "options": [_spaced(line[2:]) for line in lines[3:]],  # "A.text": drop "A."
    }


def parse_text(text: str) -> list[dict[str, Any]]:
    """Every question of one source file's text (blocks split at blank lines)."""
    return [parse_block(block) for block in text.strip().split("\n\n")]


def parse_documents(dataset: Any) -> Any:
    """lm-eval process_docs: a `text` dataset of whole files (one row each) -> the rows."""
    import datasets

    rows = [row for text in dataset["text"] for row in parse_text(text)]
    return datasets.Dataset.from_list(rows)


def prompt(doc: dict[str, Any]) -> str:
    """lm-eval's LogiQA prompt: the passage, the question, the lettered choices, "Answer:"."""
    choices = "".join(f"{letter.upper()}. {option}\n"
                      for letter, option in zip(LETTERS, doc["options"], strict=False))
    return f"Passage: {doc['context']}\nQuestion: {doc['question']}\nChoices:\n{choices}Answer:"


def gold_index(doc: dict[str, Any]) -> int:
    """The gold option's index: the label letter's place in a-d."""
    return LETTERS.index(doc["label"].strip())
