"""Which candidate facts does the base model already know? Writes orchestrator/data/known_facts.json.

The knowledge-conflict tasks (orchestrator/data/synthetic_knowledge.py) corrupt only facts the
base answers correctly, so that the noise contradicts what the model knows. This asks the
base each candidate fact greedily, in the paper's chat template, in the first training
phrasing and the first held-out phrasing, and keeps a fact when both answers are right:

- capitals: the capital is named, before any other candidate capital;
- numbers: the first number of the answer that is not a number of the question is the value.

    nice -n 19 .venv/bin/python scripts/check_known_facts.py configs/smollm2-paper-regime.yaml
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from study_eval import PROMPT, STOPS  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.data.synthetic_knowledge import (  # noqa: E402
    CANDIDATES,
    CAPITAL_CANDIDATES,
    KNOWN_FACTS_FILE,
    fact_answer,
    fact_question,
)
from orchestrator.models import load_model, load_tokenizer, materialize_base  # noqa: E402

NUMBER = re.compile(r"-?\d+")


def answered(task: str, fact: tuple[Any, ...], question: str, text: str) -> bool:
    """Whether a greedy answer `text` states the fact (see the module doc)."""
    value = fact_answer(task, fact)
    if task == "capitals":
        hits = {c: m.start() for _, c in CAPITAL_CANDIDATES
                if (m := re.search(rf"(?<!\w){re.escape(c)}(?!\w)", text, re.IGNORECASE))}
        return value in hits and hits[value] == min(hits.values())
    asked = set(NUMBER.findall(question))
    said = [n for n in NUMBER.findall(text.replace(",", "")) if n not in asked or n == value]
    return bool(said) and said[0] == value


@torch.inference_mode()
def greedy(model: Any, tok: Any, questions: list[str], max_new: int = 32, batch: int = 32) -> list[str]:
    tok.padding_side = "left"
    out = []
    for s in range(0, len(questions), batch):
        enc = tok([PROMPT.format(q=q) for q in questions[s:s + batch]], return_tensors="pt",
                  padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for seq in gen[:, enc["input_ids"].shape[1]:]:
            text = tok.decode(seq, skip_special_tokens=False)
            for stop in STOPS:
                text = text.split(stop)[0]
            out.append(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a config whose first model is the base to check")
    ap.add_argument("--base-dir", help="an already materialized base folder (skips the GGUF step)")
    ap.add_argument("--out", default=str(KNOWN_FACTS_FILE))
    args = ap.parse_args()
    torch.set_num_threads(2)
    spec = load_config(args.config).models[0]
    base = args.base_dir or materialize_base(spec, [], Path(tempfile.mkdtemp()) / "model")
    tok, model = load_tokenizer(spec, str(base)), load_model(str(base), spec).eval()
    facts: dict[str, list[list[Any]]] = {}
    counts: dict[str, str] = {}
    for task, make in CANDIDATES.items():
        cands = make()
        qs = [fact_question(task, f, held) for f in cands for held in (False, True)]
        texts = greedy(model, tok, qs)
        ok = [all(answered(task, f, qs[2 * i + k], texts[2 * i + k]) for k in (0, 1))
              for i, f in enumerate(cands)]
        facts[task] = [list(f) for f, good in zip(cands, ok, strict=True) if good]
        counts[task] = f"{sum(ok)} of {len(cands)}"
        print(f"{task}: {counts[task]} known; e.g. {qs[0]!r} -> {texts[0][:80]!r}", flush=True)
    Path(args.out).write_text(json.dumps({
        "model": spec.gguf.file if spec.gguf else spec.pretrained or spec.name,
        "checked_by": "scripts/check_known_facts.py (greedy, paper template, first training "
                      "and first held-out phrasing both right)",
        "known": counts, "facts": facts}, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
