"""Markdown tables of a scripts/paper_regime_study.py result (docs/effect-study.md uses them).

    .venv/bin/python scripts/study_tables.py paper.json [--set eval]

Per method: the mean and (min, max) over seeds of each metric, per task as well; per pair:
the paired difference's mean, its 95 % Student-t CI, the CI half-width and the minimum
detectable effect at 80 % power (3 seeds: MDE = 3.10 x sd of the paired differences).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = ("mc_acc", "mc_acc/arithmetic", "mc_acc/world_facts", "mc_acc/capitals",
           "mc_acc/known_arithmetic", "gen_em")


def method_table(result: dict[str, Any], qset: str) -> str:
    per: dict[str, list[dict[str, float]]] = {"base": [result["base"][qset]]}
    for t in result.get("trainings", []):
        per.setdefault(t["method"], []).append(t["eval"][qset])
    cols = [c for c in COLUMNS if any(c in r for rows in per.values() for r in rows)]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, rows in per.items():
        cells = []
        for c in cols:
            vals = [r[c] for r in rows if c in r]
            mean = sum(vals) / len(vals)
            cells.append(f"{mean:.3f}" if len(vals) == 1 else
                         f"{mean:.3f} ({min(vals):.3f}–{max(vals):.3f})")
        lines.append(f"| {method} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pair_table(result: dict[str, Any], qset: str) -> str:
    lines = ["| difference | metric | n | mean | 95 % CI | half-width | MDE (80 %) |",
             "|---|---|---|---|---|---|---|"]
    for p in result["summary"][qset]["pairs"]:
        star = " *" if p["significant"] else ""
        hw = "—" if p["half_width"] is None else f"{p['half_width']:.3f}"
        mde = "—" if p["mde"] is None else f"{p['mde']:.3f}"
        lines.append(f"| {p['pair']} | {p['metric']} | {p['n']} | {p['mean']:+.3f}{star} | "
                     f"[{p['lo']:+.3f}, {p['hi']:+.3f}] | {hw} | {mde} |")
    return "\n".join(lines)


def training_table(result: dict[str, Any]) -> str:
    lines = ["| method | seed | steps | Σ lr | train wall s | final pos CE | final neg CE |",
             "|---|---|---|---|---|---|---|"]
    for t in result.get("trainings", []):
        neg = t.get("final_neg_loss")
        neg_s = "—" if neg is None or neg != neg else f"{neg:.2f}"
        lines.append(f"| {t['method']} | {t['seed']} | {t['steps']} | {t['sum_lr']:.3g} | "
                     f"{t['wall_s']:.0f} | {t['final_pos_loss']:.3f} | {neg_s} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result")
    ap.add_argument("--set", dest="qset", default="eval", help="question set: eval (test) or valid")
    args = ap.parse_args()
    result = json.loads(Path(args.result).read_text())
    print(method_table(result, args.qset), end="\n\n")
    if "summary" in result:
        print(pair_table(result, args.qset), end="\n\n")
    print(training_table(result))


if __name__ == "__main__":
    main()
