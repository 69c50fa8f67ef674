"""The effect study: is forget − sft (or forget − ignore) larger than the seed noise?

Plain Python/numpy (no scipy, no mlflow): the comparison, the report and the tests share it.

Each method is trained once per seed, and a seed fixes the same data order and
initialisation for every method, so the runs pair up by seed. The paired differences
d_s = forget_s − sft_s remove what a seed does to every method alike; their mean and a
Student-t confidence interval (n − 1 degrees of freedom) say whether the effect is above
the seed noise: it is when the interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
# Which differences the comparison reports (first minus second), when both methods ran.
PAIRS = (("forget", "sft"), ("forget", "ignore"))


# --------------------------------------------------------------------------- Student t


def _t_central_mass(t: float, dof: int) -> float:
    """P(|T| < t) for Student's t with an integer number of degrees of freedom.

    Closed form for integer dof (Abramowitz & Stegun 26.7.3 / 26.7.4), exact to float
    precision, so no special-function library is needed.
    """
    if t <= 0.0:
        return 0.0
    theta = math.atan(t / math.sqrt(dof))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2 == 1:
        series, term = 0.0, math.cos(theta)
        if dof > 1:
            series = term
            for k in range(3, dof - 1, 2):  # terms cos^k θ · (2·4·…(k−1)) / (1·3·…k)
                term *= c2 * (k - 1) / k
                series += term
        return (2.0 / math.pi) * (theta + s * series)
    series, term = 1.0, 1.0
    for k in range(2, dof - 1, 2):  # terms cos^k θ · (1·3·…(k−1)) / (2·4·…k)
        term *= c2 * (k - 1) / k
        series += term
    return s * series


def t_critical(dof: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided critical value t* with P(|T| < t*) = confidence (dof >= 1)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while _t_central_mass(hi, dof) < confidence:
        hi *= 2.0
    for _ in range(200):  # bisection: the mass is increasing in t
        mid = (lo + hi) / 2.0
        if _t_central_mass(mid, dof) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


# --------------------------------------------------------------------------- paired effect


@dataclass
class PairedEffect:
    """Mean paired difference (a − b over shared seeds) with its confidence interval."""

    a: str
    b: str
    n: int  # paired seeds
    mean: float | None
    sd: float | None  # sample std of the differences (None below 2 seeds)
    lo: float | None
    hi: float | None
    confidence: float
    significant: bool  # the interval excludes 0
    verdict: str
    seeds: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cell(self, scale: float = 1.0, digits: int = 3) -> str:
        """`+0.050 [+0.041, +0.059] *` (the star: above the seed noise)."""
        if self.mean is None:
            return "-"

        def signed(x: float) -> str:  # rounded first, so a tiny negative prints +0.000
            return f"{round(x * scale, digits) + 0.0:+.{digits}f}"

        if self.lo is None or self.hi is None:
            return f"{signed(self.mean)} (1 seed)"
        mark = " *" if self.significant else ""
        return f"{signed(self.mean)} [{signed(self.lo)}, {signed(self.hi)}]{mark}"


def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating)) and math.isfinite(value)


def paired_effect(a_by_seed: Mapping[Any, float], b_by_seed: Mapping[Any, float], *,
                  a: str = "forget", b: str = "sft", confidence: float = CONFIDENCE) -> PairedEffect:
    """Pair the two methods' values by seed, then mean ± Student-t interval of a − b.

    Seeds present for one method only, or with a missing value, are left out (the pairing
    is what removes the seed's own effect). One seed gives a difference but no interval.
    """
    seeds = sorted((s for s in a_by_seed if s in b_by_seed
                    and _finite(a_by_seed[s]) and _finite(b_by_seed[s])), key=str)
    diffs = np.array([float(a_by_seed[s]) - float(b_by_seed[s]) for s in seeds], dtype=np.float64)
    n = int(diffs.size)
    pct = f"{confidence:.0%}"
    if n == 0:
        return PairedEffect(a, b, 0, None, None, None, None, confidence, False,
                            "no seed ran both methods: no difference", [])
    mean = float(diffs.mean())
    if n == 1:
        return PairedEffect(a, b, 1, mean, None, None, None, confidence, False,
                            "one seed: no interval (run more seeds to tell effect from noise)",
                            [str(s) for s in seeds])
    sd = float(diffs.std(ddof=1))
    half = t_critical(n - 1, confidence) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    significant = lo > 0.0 or hi < 0.0
    if significant:
        direction = "better" if mean > 0 else "worse"
        verdict = (f"{a} is {direction} than {b} beyond the seed noise "
                   f"({pct} Student-t CI over {n} paired seeds excludes 0)")
    else:
        verdict = (f"within the seed noise ({pct} Student-t CI over {n} paired seeds "
                   "includes 0)")
    return PairedEffect(a, b, n, mean, sd, lo, hi, confidence, significant, verdict,
                        [str(s) for s in seeds])


def mean_and_spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof=1); the std is None below two finite values."""
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def family_effects(per_seed: Mapping[str, Mapping[Any, float]], *,
                   pairs: tuple[tuple[str, str], ...] = PAIRS,
                   confidence: float = CONFIDENCE) -> list[PairedEffect]:
    """{method: {seed: value}} of one family and one metric -> the paired effects of `pairs`
    whose two methods both ran."""
    return [paired_effect(per_seed[a], per_seed[b], a=a, b=b, confidence=confidence)
            for a, b in pairs if a in per_seed and b in per_seed]


def pair_table(records: list[dict[str, Any]], cell: Callable[[PairedEffect], str],
               metrics: list[str] | None = None) -> pd.DataFrame:
    """Rows (family, "a − b"), a column `n` (paired seeds), per metric `cell(effect)`
    (records as from tracking.compare.effects: family, metric, effect)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        eff: PairedEffect = rec["effect"]
        if metrics is not None and rec["metric"] not in metrics:
            continue
        row = rows.setdefault((rec["family"], f"{eff.a} − {eff.b}"), {"n": eff.n})
        row[rec["metric"]] = cell(eff)
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["family", "difference"])
    return table
