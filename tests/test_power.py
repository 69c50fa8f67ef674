"""Power of the paired comparison: CI half-width and minimum detectable effect (MDE), on fixed
numbers checked by hand against a t table, and in `lethe compare`'s report."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_effect import ORDER, scripted_runs

from orchestrator.tracking.compare import effects, report_text, summary_metrics
from orchestrator.tracking.effect import paired_effect
from orchestrator.tracking.power import effect_power, paired_power, power_table, t_one_sided


@pytest.mark.parametrize("dof, table_value", [(2, 1.061), (4, 0.941), (9, 0.883), (29, 0.854)])
def test_one_sided_t_matches_the_t_table_at_80_percent(dof, table_value):
    assert t_one_sided(dof, 0.8) == pytest.approx(table_value, abs=1e-3)


def test_one_sided_t_rejects_a_probability_below_one_half():
    with pytest.raises(ValueError, match="one-sided probability"):
        t_one_sided(3, 0.4)


def test_mde_by_hand_three_seeds():
    # differences +0.02, +0.05, -0.01: mean 0.02, sd 0.03 (by hand: deviations 0, .03, -.03;
    # squares .0009 + .0009 = .0018, / 2 = .0009, sqrt = .03)
    eff = paired_effect({"0": 0.52, "1": 0.55, "2": 0.49}, {"0": 0.50, "1": 0.50, "2": 0.50})
    assert eff.sd == pytest.approx(0.03)
    p = effect_power(eff)
    se = 0.03 / math.sqrt(3)  # 0.017321
    assert p.half_width == pytest.approx(4.3027 * se, abs=1e-4)  # 0.0745
    assert p.mde == pytest.approx((4.3027 + 1.0607) * se, abs=1e-4)  # 0.0929
    assert p.mde == pytest.approx(0.0929, abs=1e-4)
    # the CI of the effect is the same half-width
    assert eff.hi - eff.mean == pytest.approx(p.half_width)


def test_more_seeds_resolve_smaller_effects():
    assert paired_power(0.03, 10).mde < paired_power(0.03, 5).mde < paired_power(0.03, 3).mde
    # ten seeds: (2.262 + 0.883) * 0.03 / sqrt(10)
    assert paired_power(0.03, 10).mde == pytest.approx(3.145 * 0.03 / math.sqrt(10), abs=2e-4)


def test_power_needs_two_seeds():
    with pytest.raises(ValueError, match="at least 2 paired seeds"):
        paired_power(0.1, 1)
    assert effect_power(paired_effect({"0": 0.6}, {"0": 0.5})) is None


def test_compare_report_prints_half_width_and_mde_per_family_and_metric():
    runs = scripted_runs()
    records = effects(runs, ORDER)
    table = power_table(records)
    assert list(table.index)[:2] == [("planted", "forget − sft"), ("planted", "forget − ignore")]
    rec = next(r for r in records if r["family"] == "planted" and r["effect"].b == "sft"
               and r["metric"] == "mc/acc")
    p = effect_power(rec["effect"])
    assert table.loc[("planted", "forget − sft"), "mc/acc"] == (
        f"±{p.half_width:.3f} / MDE {p.mde:.3f}")
    text = report_text(runs, pd.DataFrame(), ORDER)
    assert "minimum detectable effect at 80% power" in text
    assert f"MDE {p.mde:.3f}" in text
    metrics = summary_metrics(*summarise_parts(runs), records, pd.DataFrame())
    assert metrics["effect/planted/forget-sft/mc/acc/mde"] == pytest.approx(p.mde)


def test_one_seed_report_has_no_power_section():
    runs = scripted_runs()
    text = report_text(runs[runs["seed"].isin(["-", "1"])], pd.DataFrame(), ORDER)
    assert "minimum detectable effect" not in text


def summarise_parts(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    from orchestrator.tracking.compare import summarise

    _, means, stds = summarise(runs, ORDER)
    return means, stds
