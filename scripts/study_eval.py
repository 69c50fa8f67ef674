"""Batched held-out evaluation for the study scripts (no lm-eval, no Ray).

The same prompts, MC scoring and answer extraction as the lm-eval tasks lethe_synth_mc /
lethe_synth_gen (orchestrator/evaluation/tasks.py): MC = sum log-likelihood of each full
choice after the paper-template prompt (acc), generation = greedy decoding, final answer
after "The answer is", exact match ignoring case. Batched (MC rows by length, generation
with left padding), so that 200 + 200 questions fit a 2-core budget; results are cached beside
the model, keyed by the question files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.evaluation.tasks import FINAL_ANSWER_REGEX, gold_answer
from orchestrator.models import load_model, load_tokenizer

PROMPT = "<|user|>\n{q}\n<|assistant|>\n"
ANSWER_RE = re.compile(FINAL_ANSWER_REGEX)
STOPS = ("<|endoftext|>", "\n<|", "<|user|>")


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def evaluate_sets(model_dir: str | Path, spec: Any, data: Path, prefixes: tuple[str, ...] = ("eval",),
                  max_gen: int = 40, batch: int = 32) -> dict[str, dict[str, float]]:
    """{prefix: {mc_acc, gen_em, per_task...}} for each question set (`eval` = test,
    `valid` = validation); cached in <model_dir>/study_eval_sets.json."""
    cache = Path(model_dir) / "study_eval_sets.json"
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    out: dict[str, dict[str, float]] = {}
    model = tok = None
    for prefix in prefixes:
        files = [data / f"{prefix}_mc.jsonl", data / f"{prefix}_gen.jsonl"]
        ident = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
        if saved.get(prefix, {}).get("ident") == ident:
            out[prefix] = saved[prefix]["result"]
            continue
        if model is None:
            tok = load_tokenizer(spec, str(model_dir))
            model = load_model(str(model_dir), spec).eval()
        res = {**mc_accuracy(model, tok, _rows(files[0])),
               **gen_exact_match(model, tok, _rows(files[1]), max_gen, batch)}
        saved[prefix] = {"ident": ident, "result": res}
        cache.write_text(json.dumps(saved, indent=1))
        out[prefix] = res
    return out


@torch.inference_mode()
def mc_accuracy(model: Any, tok: Any, rows: list[dict[str, Any]], token_budget: int = 4096
                ) -> dict[str, float]:
    seqs: list[tuple[list[int], int, int]] = []  # (ids, context length, row index)
    for i, row in enumerate(rows):
        prompt = PROMPT.format(q=row["question"])
        ctx = len(tok(prompt, add_special_tokens=False)["input_ids"])
        for choice in row["choices"]:
            seqs.append((tok(prompt + choice, add_special_tokens=False)["input_ids"], ctx, i))
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][0]))
    ll = np.zeros(len(seqs))
    pad = tok.pad_token_id or 0
    start = 0
    while start < len(order):
        width = len(seqs[order[min(len(order) - 1, start)]][0])
        n = max(1, token_budget // max(1, width))
        part = order[start:start + n]
        width = max(len(seqs[k][0]) for k in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        for j, k in enumerate(part):  # right padding: a causal model's earlier logits ignore it
            ids[j, :len(seqs[k][0])] = torch.tensor(seqs[k][0])
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        for j, k in enumerate(part):
            full, ctx, _ = seqs[k]
            tgt = torch.tensor(full[ctx:])
            ll[k] = float(logp[j, ctx - 1:len(full) - 1].gather(1, tgt[:, None]).sum())
        start += len(part)
    scores = np.full((len(rows), 4), -np.inf)
    seen = [0] * len(rows)
    for k, (_, _, i) in enumerate(seqs):
        scores[i, seen[i]] = ll[k]
        seen[i] += 1
    hit = scores.argmax(1) == np.array([r["gold"] for r in rows])
    out = {"mc_acc": float(hit.mean())}
    for task in sorted({r["task"] for r in rows}):
        sel = np.array([r["task"] == task for r in rows])
        out[f"mc_acc/{task}"] = float(hit[sel].mean())
    return out


@torch.inference_mode()
def gen_exact_match(model: Any, tok: Any, rows: list[dict[str, Any]], max_new: int, batch: int
                    ) -> dict[str, float]:
    side = tok.padding_side
    tok.padding_side = "left"
    hits: list[bool] = []
    try:
        for s in range(0, len(rows), batch):
            part = rows[s:s + batch]
            enc = tok([PROMPT.format(q=r["question"]) for r in part], return_tensors="pt",
                      padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for r, seq in zip(part, out[:, enc["input_ids"].shape[1]:], strict=True):
                text = tok.decode(seq, skip_special_tokens=False)
                for stop in STOPS:
                    text = text.split(stop)[0]
                found = ANSWER_RE.findall(text)
                gold = gold_answer(str(r["answer"]))
                hits.append(bool(found) and found[-1].strip().lower() == gold.lower())
    finally:
        tok.padding_side = side
    arr = np.array(hits)
    out = {"gen_em": float(arr.mean())}
    for task in sorted({r["task"] for r in rows}):
        sel = np.array([r["task"] == task for r in rows])
        out[f"gen_em/{task}"] = float(arr[sel].mean())
    return out
