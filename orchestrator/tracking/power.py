"""What "within the seed noise" means: CI half-width and minimum detectable effect (MDE).

Plain Python (no scipy, no mlflow), beside tracking/effect.py whose Student-t quantiles it
reuses. For n paired seeds with differences d_s (a − b) of sample std sd:

    half-width  h   = t_{1−α/2, n−1} · sd / √n        (the paired CI is mean ± h)
    MDE             = (t_{1−α/2, n−1} + t_{power, n−1}) · sd / √n

The MDE is the true mean difference that a two-sided paired t-test at level α would detect
with probability `power` (80 % by default) if the seed-to-seed spread of the differences were
the observed sd — the usual normal-approximation formula with Student-t quantiles in place of
z (it treats sd as known, so it is slightly optimistic for very few seeds). With 3 seeds,
α = 0.05 and 80 % power: MDE = (4.303 + 1.061) · sd / √3 = 3.10 · sd. An effect smaller than
the MDE may be real and still go undetected: "within the seed noise" is not "no effect".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from orchestrator.tracking.effect import CONFIDENCE, PairedEffect, pair_table, t_critical

POWER = 0.8


def t_one_sided(dof: int, prob: float) -> float:
    """The quantile t with P(T < t) = prob (prob in (0.5, 1)), from the two-sided value:
    P(T < t) = p  <=>  P(|T| < t) = 2p − 1."""
    if not 0.5 < prob < 1.0:
        raise ValueError(f"one-sided probability must be in (0.5, 1), got {prob}")
    return t_critical(dof, 2.0 * prob - 1.0)


@dataclass(frozen=True)
class Power:
    """Resolution of one paired comparison."""

    n: int
    sd: float
    half_width: float
    mde: float
    confidence: float
    power: float


def paired_power(sd: float, n: int, confidence: float = CONFIDENCE,
                 power: float = POWER) -> Power:
    """Half-width of the paired CI and the MDE for n paired seeds with difference spread sd."""
    if n < 2:
        raise ValueError(f"power needs at least 2 paired seeds, got {n}")
    if not math.isfinite(sd) or sd < 0:
        raise ValueError(f"sd must be a finite value >= 0, got {sd!r}")
    se = sd / math.sqrt(n)
    t_alpha = t_critical(n - 1, confidence)
    t_beta = t_one_sided(n - 1, power)
    return Power(n, sd, t_alpha * se, (t_alpha + t_beta) * se, confidence, power)


def effect_power(effect: PairedEffect, power: float = POWER) -> Power | None:
    """The power figures of a PairedEffect (None below two paired seeds)."""
    if effect.n < 2 or effect.sd is None:
        return None
    return paired_power(effect.sd, effect.n, effect.confidence, power)


def power_table(records: list[dict[str, Any]], metrics: list[str] | None = None,
                power: float = POWER, scale: float = 1.0, digits: int = 3) -> pd.DataFrame:
    """Rows (family, "a − b"), per metric the cell `±h / MDE m` (records as from
    tracking.compare.effects)."""
    def cell(eff: PairedEffect) -> str:
        p = effect_power(eff, power)
        return "-" if p is None else \
            f"±{p.half_width * scale:.{digits}f} / MDE {p.mde * scale:.{digits}f}"

    return pair_table(records, cell, metrics)


def power_section(records: list[dict[str, Any]], metrics: list[str] | None = None,
                  power: float = POWER, scale: float = 1.0, digits: int = 3) -> list[str]:
    """The lines `lethe compare` prints under the paired differences (empty without seeds)."""
    table = power_table(records, metrics, power, scale, digits)
    if table.empty or (table.drop(columns="n") == "-").all().all():
        return []
    conf = records[0]["effect"].confidence
    return ["", f"Resolution: ±half-width of the {conf:.0%} paired CI / minimum detectable "
            f"effect at {power:.0%} power, MDE = (t(1−α/2, n−1) + t({power:g}, n−1)) · sd/√n "
            "with sd the observed spread of the paired differences:",
            table.to_string(justify="left")]


def power_metrics(records: list[dict[str, Any]], power: float = POWER) -> dict[str, float]:
    """`effect/<family>/<a>-<b>/<metric>/{half_width,mde}` for the parent run."""
    out: dict[str, float] = {}
    for rec in records:
        eff: PairedEffect = rec["effect"]
        p = effect_power(eff, power)
        if p is not None:
            key = f"effect/{rec['family']}/{eff.a}-{eff.b}/{rec['metric']}"
            out[f"{key}/half_width"] = p.half_width
            out[f"{key}/mde"] = p.mde
    return out
