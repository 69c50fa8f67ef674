"""Look at one training sample token by token: score, class and ground-truth noise.

Prompt tokens are dimmed; response tokens get a diverging colour by score
(`CE_base - CE_ref`: blue = the reference learned it, red = it got worse), their class
(+ positive, − negative, · not trained) and a noise marker (!) where the synthetic corpus
injected noise. Output: ANSI text for a terminal and a self-contained HTML page (inline CSS,
no scripts or external files) that can be logged to MLflow as an artifact.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

CLASS_MARK = {1: "+", -1: "−", 0: "·"}
NOISE_MARK = "!"
_DIM = "\x1b[2m"
_RESET = "\x1b[0m"


def _read_sample(path: str | Path, sample_id: int, columns: list[str] | None = None) -> dict:
    """One row by sample_id from a Parquet file or a folder of Parquet files."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(path), format="parquet")
    names = set(dataset.schema.names)
    cols = [c for c in columns if c in names] if columns else None
    table = dataset.to_table(columns=cols, filter=ds.field("sample_id") == sample_id)
    if table.num_rows == 0:
        raise KeyError(f"sample_id {sample_id} not found in {path}")
    return {name: table.column(name)[0].as_py() for name in table.column_names}


def diverging_rgb(score: float, scale: float) -> tuple[int, int, int]:
    """Red (negative) - white (0) - blue (positive), saturating at |score| = scale."""
    if not math.isfinite(score) or scale <= 0:
        return (255, 255, 255)
    t = max(-1.0, min(1.0, score / scale))
    if t >= 0:  # white -> blue (33, 102, 172)
        return (round(255 - t * 222), round(255 - t * 153), round(255 - t * 83))
    t = -t  # white -> red (178, 24, 43)
    return (round(255 - t * 77), round(255 - t * 231), round(255 - t * 212))


def sample_tokens(partitioned_parquet: str | Path, scores_parquet: str | Path,
                  tokenizer_dir: str | Path, sample_id: int) -> list[dict[str, Any]]:
    """Per token: text, is_response, score (NaN off-response), class, noise."""
    from transformers import AutoTokenizer

    part = _read_sample(partitioned_parquet, sample_id,
                        ["sample_id", "input_ids", "response_mask", "noise_mask", "token_class"])
    scores = _read_sample(scores_parquet, sample_id, ["sample_id", "base_loss", "ref_loss"])
    ids = part["input_ids"]
    n = len(ids)
    if len(scores["base_loss"]) != n or len(scores["ref_loss"]) != n:
        raise ValueError(f"sample {sample_id}: scores length {len(scores['base_loss'])} "
                         f"!= {n} tokens (scores and tokens come from different runs?)")
    from orchestrator.method.score import token_scores

    # The partition's own score (float32, as stored); None in Parquet lists arrives as NaN.
    score = token_scores(np.asarray(scores["base_loss"], dtype=np.float32),
                         np.asarray(scores["ref_loss"], dtype=np.float32))
    response = part.get("response_mask") or [0] * n
    classes = part.get("token_class") or response
    noise = part.get("noise_mask")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    return [{
        "index": i,
        "id": int(ids[i]),
        "text": tok.decode([ids[i]]),
        "is_response": bool(response[i]),
        "score": float(score[i]) if response[i] else float("nan"),
        "class": int(classes[i]),
        "noise": bool(noise[i]) if noise is not None else None,
    } for i in range(n)]


def _scale(tokens: list[dict[str, Any]]) -> float:
    vals = [abs(t["score"]) for t in tokens if t["is_response"] and math.isfinite(t["score"])]
    return max(vals) if vals else 1.0


def render_terminal(tokens: list[dict[str, Any]], sample_id: int) -> str:
    scale = _scale(tokens)
    inline = []
    for t in tokens:
        text = t["text"]
        if not t["is_response"]:
            inline.append(f"{_DIM}{text}{_RESET}")
            continue
        r, g, b = diverging_rgb(t["score"], scale)
        inline.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}{_RESET}")
    has_noise = any(t["noise"] is not None for t in tokens)
    lines = [f"sample {sample_id}: {len(tokens)} tokens, "
             f"{sum(t['is_response'] for t in tokens)} response tokens; colour scale ±{scale:.3f}",
             "".join(inline), "",
             f"{'pos':>5}  {'token':<18} {'score':>9}  class" + ("  noise" if has_noise else "")]
    for t in tokens:
        if not t["is_response"]:
            continue
        noise = ("  " + (NOISE_MARK if t["noise"] else " ")) if has_noise else ""
        lines.append(f"{t['index']:>5}  {t['text']!r:<18} {t['score']:>9.4f}  "
                     f"{CLASS_MARK.get(t['class'], '?'):>5}{noise}")
    return "\n".join(lines)


def render_html(tokens: list[dict[str, Any]], sample_id: int) -> str:
    scale = _scale(tokens)
    spans = []
    for t in tokens:
        text = html.escape(t["text"]).replace("\n", "↵<br>")
        if not t["is_response"]:
            spans.append(f'<span class="prompt">{text}</span>')
            continue
        r, g, b = diverging_rgb(t["score"], scale)
        mark = CLASS_MARK.get(t["class"], "?")
        noise = bool(t["noise"])
        title = (f"pos {t['index']} | id {t['id']} | score {t['score']:.4f} | class {mark}"
                 + (" | noise" if noise else ""))
        cls = "tok noise" if noise else "tok"
        noise_sup = f'<sup class="nz">{NOISE_MARK}</sup>' if noise else ""
        spans.append(f'<span class="{cls}" style="background:rgb({r},{g},{b})" '
                     f'title="{html.escape(title)}">{text}<sup class="cl">{mark}</sup>'
                     f"{noise_sup}</span>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Lethe sample {sample_id}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.text {{ font-family: monospace; line-height: 2.2; white-space: pre-wrap; }}
.prompt {{ color: #999; }}
.tok {{ border-radius: 3px; padding: 1px 0; }}
.noise {{ outline: 2px dashed #000; }}
sup.cl {{ font-size: 0.6em; color: #333; }}
sup.nz {{ font-size: 0.6em; color: #b00; font-weight: bold; }}
.legend span {{ padding: 2px 8px; margin-right: 4px; }}
</style></head><body>
<h2>Sample {sample_id}</h2>
<p class="legend">score = CE<sub>base</sub> − CE<sub>ref</sub>, colour scale ±{scale:.3f}:
<span style="background:rgb{diverging_rgb(-scale, scale)}">−{scale:.2f}</span>
<span style="background:#fff;border:1px solid #ccc">0</span>
<span style="background:rgb{diverging_rgb(scale, scale)}">+{scale:.2f}</span>
class: + positive, − negative, · not trained; {NOISE_MARK} = ground-truth noise;
grey = prompt. Hover a token for its score.</p>
<div class="text">{"".join(spans)}</div>
</body></html>
"""


def inspect_sample(partitioned_parquet: str | Path, scores_parquet: str | Path,
                   tokenizer_dir: str | Path, sample_id: int) -> tuple[str, str]:
    """(ANSI terminal text, self-contained HTML) for one sample."""
    tokens = sample_tokens(partitioned_parquet, scores_parquet, tokenizer_dir, sample_id)
    return render_terminal(tokens, sample_id), render_html(tokens, sample_id)
