"""Warm-up pretraining of a tiny base model on clean synthetic text (a base-stage option).

A model built from config starts at random weights: it knows nothing of the task, so noisy
fine-tuning cannot hurt what it knows and the reference's excess loss is mostly "how much the
reference learned at all". The paper's setting is a pretrained model that already knows the
domain. `warmup` stands in for that pretraining: the base model is trained for a few hundred
steps on *clean* conversations drawn from the same task generators as the synthetic corpus,
before any Lethe stage sees it.

What the warm-up text never contains: the questions reserved for evaluation and validation
(eval_mc, eval_gen, clean_valid) of the corpus it accompanies, so held-out accuracy stays
held out. The warm-up rows are drawn with their own seed (`warmup.seed`), independently of
the noisy training pool, and carry no noise.

Plain torch (no Ray): the whole text of each conversation is the target (next-token loss
on every non-pad position), AdamW, linear warm-up and decay, seeded, deterministic on CPU.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from orchestrator.config import ModelSpec, SyntheticConfig, WarmupConfig
from orchestrator.data.chat_format import conversation_from_row, render_paper
from orchestrator.data.synthetic_tasks import TASKS, render
from orchestrator.models.tokenizer import load_tokenizer

WARMUP_REPORT = "warmup.json"
_MAX_DRAWS = 100


def reserved_questions(synthetic_dir: str | Path) -> set[str]:
    """Every question the corpus holds out: eval_mc / eval_gen (and valid_mc / valid_gen,
    when written) questions and the user turns of clean_valid. A missing file is an error (the warm-up must not guess)."""
    root = Path(synthetic_dir)
    out: set[str] = set()
    optional = [n for n in ("valid_mc.jsonl", "valid_gen.jsonl") if (root / n).is_file()]
    for name in ("eval_mc.jsonl", "eval_gen.jsonl", "clean_valid.jsonl", *optional):
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"warm-up needs the corpus's held-out rows: {path} is missing")
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "question" in row:
                    out.add(str(row["question"]))
                elif "messages" in row:
                    out.update(m["content"] for m in row["messages"] if m.get("role") == "user")
                else:
                    raise ValueError(f"{path}:{line_no}: neither 'question' nor 'messages'")
    return out


def warmup_conversations(tasks: list[str], num_rows: int, seed: int,
                         avoid: set[str]) -> list[list[dict[str, str]]]:
    """`num_rows` clean single-turn conversations from the task generators, none of whose
    questions is in `avoid`."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"warm-up tasks {unknown or tasks} not in {sorted(TASKS)}")
    rng = random.Random(seed)
    out = []
    for _ in range(num_rows):
        for _ in range(_MAX_DRAWS):
            problem = TASKS[rng.choice(tasks)](rng, False)
            if problem.question not in avoid:
                break
        else:
            raise ValueError(f"warm-up: no question outside the {len(avoid)} reserved ones "
                             f"after {_MAX_DRAWS} draws")
        out.append([{"role": "user", "content": problem.question},
                    {"role": "assistant", "content": render(problem, problem.answer)[0]}])
    return out


def warmup_texts(synthetic: SyntheticConfig, cfg: WarmupConfig, avoid: set[str],
                 eos_token: str) -> list[str]:
    """The warm-up corpus as chat-template text (the paper template the pipeline trains on)."""
    tasks = list(cfg.tasks or synthetic.tasks)
    convs = warmup_conversations(tasks, cfg.rows, cfg.seed, avoid)
    return [render_paper(conversation_from_row({"messages": m}), eos_token).text for m in convs]


def _lr_factor(step: int, total: int, warm: int) -> float:
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def warmup_model(spec: ModelSpec, model_dir: str | Path, texts: list[str], cfg: WarmupConfig,
                 max_len: int) -> dict[str, Any]:
    """Train the model saved in `model_dir` on `texts` for cfg.steps steps and save it back
    in place (weights only; config and tokenizer are unchanged). Returns the report that
    is also written to model_dir/warmup.json."""
    if not texts:
        raise ValueError("warm-up corpus is empty")
    model_dir = Path(model_dir)
    tok = load_tokenizer(spec, str(model_dir))
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    enc = [np.asarray(ids[:max_len], np.int64)
           for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))
    warm = max(1, math.ceil(cfg.warmup_ratio * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, warm))
    order_rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    started, cpu_started, started_at = time.perf_counter(), time.process_time(), time.time()
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order.extend(order_rng.permutation(len(enc)).tolist())
        rows = [enc[order.pop()] for _ in range(cfg.batch_size)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.from_numpy(r)
            labels[i, :len(r)] = torch.from_numpy(r)
            mask[i, :len(r)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"warm-up of '{spec.name}': non-finite loss at step "
                                     f"{len(losses) + 1}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int(mask.sum())
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    trained_at = time.time()  # wall-clock stamps: the pipeline timeline's compute span
    model.save_pretrained(str(model_dir))
    tail = losses[-max(1, len(losses) // 10):]
    report = {"steps": cfg.steps, "rows": len(enc), "tokens": tokens, "seconds": seconds,
              "cpu_seconds": cpu, "tokens_per_s": tokens / seconds if seconds else 0.0,
              "tokens_per_cpu_s": tokens / cpu if cpu else 0.0,
              "first_loss": losses[0], "final_loss": float(np.mean(tail)),
              "started_at": started_at, "trained_at": trained_at}
    (model_dir / WARMUP_REPORT).write_text(json.dumps(report, indent=2))
    return report


def warm_up_base(spec: ModelSpec, model_dir: str | Path, synthetic: SyntheticConfig,
                 synthetic_dir: str | Path, max_len: int) -> dict[str, Any]:
    """The base stage's warm-up: clean text that avoids the corpus's held-out questions."""
    if spec.warmup is None:
        raise ValueError(f"model '{spec.name}' has no warmup section")
    tok = load_tokenizer(spec, str(model_dir))
    texts = warmup_texts(synthetic, spec.warmup, reserved_questions(synthetic_dir),
                         str(tok.eos_token))
    return warmup_model(spec, model_dir, texts, spec.warmup, max_len)
