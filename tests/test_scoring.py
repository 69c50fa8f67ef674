"""TokenScorer (plain) and the Ray Data scoring stage against a one-sample-at-a-time loop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from orchestrator.cache import SUCCESS
from orchestrator.config import ModelSpec, ScoringConfig
from orchestrator.models import build_model, load_model
from orchestrator.scoring import TokenScorer, plan_micro_batches, run_scoring, score_files
from orchestrator.scoring import stage as scoring_stage
from orchestrator.scoring.blocks import ScoredParts

VOCAB = 97
FAMILIES = ["llama", "qwen2", "gpt_neo"]
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
        "max_position_embeddings": 128}


def _tiny_spec(family: str) -> ModelSpec:
    sizes = dict(TINY)
    if family != "gpt_neo":
        sizes["num_kv_heads"] = 2
    else:
        sizes["window_size"] = 16  # shorter than some samples: local attention is exercised
    return ModelSpec(name=f"tiny-{family}", family=family, from_config=sizes)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """(base, reference) folders per family: same architecture, different random weights."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family in FAMILIES:
        paths = []
        for role, seed in (("base", 0), ("ref", 1)):
            path = root / f"{family}-{role}"
            build_model(_tiny_spec(family), VOCAB, seed=seed).save_pretrained(str(path))
            paths.append(str(path))
        out[family] = tuple(paths)
    return out


def _make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(2, 60)) if i else 1  # sample 0: a single token, nothing to score
        ids = rng.integers(0, VOCAB, size=length).astype(np.int32)
        prompt = int(rng.integers(1, max(2, length)))
        mask = np.zeros(length, dtype=np.int8)
        if i % 7 != 3:  # a few samples without any response token
            mask[prompt:] = 1
        if i % 5 == 0 and length > 3:
            mask[-2] = 0  # a hole inside the response
        rows.append({"sample_id": 1000 + 3 * i, "input_ids": ids, "response_mask": mask})
    return rows


def _write_tokens(rows: list[dict], path: Path) -> Path:
    # Shuffled on disk: nothing may assume tokens.parquet is sorted by sample_id.
    order = np.random.default_rng(1).permutation(len(rows))
    rows = [rows[i] for i in order]
    table = pa.table({
        "sample_id": pa.array([r["sample_id"] for r in rows], pa.int64()),
        "input_ids": pa.array([r["input_ids"] for r in rows], pa.list_(pa.int32())),
        "response_mask": pa.array([r["response_mask"] for r in rows], pa.list_(pa.int8())),
        "num_tokens": pa.array([len(r["input_ids"]) for r in rows], pa.int32()),
    })
    pq.write_table(table, path, row_group_size=16)
    return path


def _reference_losses(model_path: str, rows: list[dict]) -> dict[int, np.ndarray]:
    """Plain loop: one sample at a time, full logits, F.cross_entropy, NaN off response."""
    model = load_model(model_path).eval()
    out = {}
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor(r["input_ids"], dtype=torch.long)[None]
            loss = np.full(ids.shape[1], np.nan, dtype=np.float32)
            if ids.shape[1] > 1:
                logits = model(input_ids=ids).logits[0].float()
                ce = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").numpy()
                keep = r["response_mask"][1:] == 1
                loss[1:][keep] = ce[keep]
            out[r["sample_id"]] = loss
    return out


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return _make_rows(40)


@pytest.fixture(scope="module")
def expected(model_dirs, rows) -> dict[str, dict[str, dict[int, np.ndarray]]]:
    return {
        family: {"base": _reference_losses(base, rows), "ref": _reference_losses(ref, rows)}
        for family, (base, ref) in model_dirs.items()
    }


def _assert_matches(sample_ids, base_loss, ref_loss, exp: dict) -> None:
    assert sorted(int(s) for s in sample_ids) == sorted(exp["base"])
    for sid, b, r in zip(sample_ids, base_loss, ref_loss, strict=True):
        for got, want in ((b, exp["base"][int(sid)]), (r, exp["ref"][int(sid)])):
            got = got if isinstance(got, np.ndarray) else np.asarray(got, dtype=np.float32)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"sample {sid}")
            np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], atol=1e-5,
                                       rtol=1e-5, err_msg=f"sample {sid}")


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    obj = lambda key: np.array([r[key] for r in rows] + [None], dtype=object)[:-1]  # noqa: E731
    return {"sample_id": np.array([r["sample_id"] for r in rows]), "input_ids": obj("input_ids"),
            "response_mask": obj("response_mask")}


def test_plan_micro_batches_respects_budget_and_covers_rows():
    lengths = np.array([5, 40, 7, 40, 12, 100, 3])
    groups = plan_micro_batches(lengths, token_budget=64)
    seen = np.sort(np.concatenate(groups))
    np.testing.assert_array_equal(seen, np.arange(len(lengths)))
    assert [g.tolist() for g in groups][0] == [5]  # 100 > budget: alone
    for g in groups[1:]:
        assert len(g) * lengths[g].max() <= 64
    assert [g.tolist() for g in groups[1:3]] == [[1], [3]]  # 2 x 40 > 64


def test_plan_micro_batches_padding_on_sft_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(350), 0.9, 256)), 20, 2048).astype(int)
    groups = plan_micro_batches(lengths, token_budget=16384)
    computed = sum(len(g) * lengths[g].max() for g in groups)
    assert all(len(g) * lengths[g].max() <= 16384 for g in groups)
    assert 1 - lengths.sum() / computed < 0.12  # data order in sixes pads ~50 %
    assert len(groups) <= 1.3 * np.ceil(computed / 16384)  # not one pass per row
    # Without a per-pass price the plan would pad nothing by running one row per pass.
    assert len(plan_micro_batches(lengths, 16384, overhead_tokens=0)) == 256


@pytest.mark.parametrize("family", FAMILIES)
def test_token_scorer_matches_single_sample_loop(model_dirs, rows, expected, family):
    base, ref = model_dirs[family]
    # A small budget forces several padded multi-row micro-batches.
    scorer = TokenScorer(base, ref, dtype="auto", device="cpu", token_budget=160, chunk_size=16)
    out = scorer(_batch(rows))
    np.testing.assert_array_equal(out["sample_id"], [r["sample_id"] for r in rows])  # input order
    _assert_matches(out["sample_id"], out["base_loss"], out["ref_loss"], expected[family])
    c = scorer.counters
    assert c.real_tokens == sum(len(r["input_ids"]) for r in rows)
    assert c.computed_tokens == int(out["padded_length"].sum()) > c.real_tokens
    assert c.micro_batches > 5
    assert c.scored_tokens == sum(int((r["response_mask"][1:] == 1).sum()) for r in rows)


def test_token_scorer_rejects_bad_rows(model_dirs, rows):
    base, ref = model_dirs["llama"]
    scorer = TokenScorer.from_models(load_model(base), load_model(ref), token_budget=128)
    bad = [dict(rows[2]), dict(rows[1])]
    bad[1]["input_ids"] = bad[1]["input_ids"].copy()
    bad[1]["input_ids"][0] = VOCAB + 5
    with pytest.raises(ValueError, match=f"sample_id {rows[1]['sample_id']}: token id outside"):
        scorer(_batch(bad))
    short = [dict(rows[4], response_mask=rows[4]["response_mask"][:-1])]
    with pytest.raises(ValueError, match=f"sample_id {rows[4]['sample_id']}: input_ids has"):
        scorer(_batch(short))
    with pytest.raises(KeyError, match="response_mask"):
        scorer({"sample_id": np.array([1]), "input_ids": np.array([[1, 2]])})


def _read_scores(out_dir: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in score_files(out_dir)]).sort_by("sample_id")


def _assert_full_run(out: Path, rows: list[dict], exp: dict) -> dict:
    """A finished stage's output equals the plain loop's losses: schema, rows, summary."""
    table = _read_scores(out)
    assert table.schema.field("base_loss").type == pa.list_(pa.float32())
    assert table.column_names == ["sample_id", "base_loss", "ref_loss"]
    d = table.to_pydict()
    _assert_matches(d["sample_id"], d["base_loss"], d["ref_loss"], exp)
    summary = json.loads((out / SUCCESS).read_text())
    assert summary["rows"] == summary["rows_scored_this_run"] == len(rows)
    assert summary["rows_skipped"] == 0 and summary["files_written"] == len(score_files(out)) >= 1
    assert summary["tokens_this_run"] == sum(len(r["input_ids"]) for r in rows)
    assert 0.0 < summary["padding_waste"] < 1.0
    assert not (out / scoring_stage.STATS_DIR).exists()
    return summary


def _assert_close_scores(a: pa.Table, b: pa.Table, atol: float = 1e-6) -> None:
    """Same rows (by sample_id), same NaN positions, losses within `atol`."""
    da, db = a.sort_by("sample_id").to_pydict(), b.sort_by("sample_id").to_pydict()
    assert da["sample_id"] == db["sample_id"]
    for key in ("base_loss", "ref_loss"):
        for sid, x, y in zip(da["sample_id"], da[key], db[key], strict=True):
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
            np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=f"{key} {sid}")
            np.testing.assert_allclose(x[~np.isnan(x)], y[~np.isnan(y)], rtol=0, atol=atol,
                                       err_msg=f"{key} {sid}")


# Each family goes through the Ray stage once: gpt_neo here (Ray Data's default Parquet
# reader, as on a cluster), llama in the resume test and qwen2 in the comparison with the
# bare scorer (the embedded instance's settings, as `lethe run` uses them locally).
@pytest.mark.ray
def test_ray_scoring_matches_loop(ray_local, tmp_path, model_dirs, rows, expected, capsys):
    tokens = _write_tokens(rows, tmp_path / "tokens.parquet")
    cfg = ScoringConfig(num_actors=2, batch_size=8, token_budget=200, chunk_size=32)
    base, ref = model_dirs["gpt_neo"]
    out = run_scoring(tokens, base, ref, cfg, tmp_path / "scores")
    summary = _assert_full_run(out, rows, expected["gpt_neo"])
    assert summary["timings"]["actors"] >= 1 and summary["timings"]["actor_score_s"] > 0
    # Ray Data ran it: its stats name the pool's operator and the write.
    stats = (out / scoring_stage.STATS_FILE).read_text()
    assert "MapBatches(ScoreBatches)" in stats and "Write" in stats, stats[-3000:]
    assert str(out / scoring_stage.STATS_FILE) in capsys.readouterr().out


@pytest.mark.ray
def test_ray_scoring_resumes_missing_rows_only(ray_local, tmp_path, model_dirs, rows, expected):
    tokens = _write_tokens(rows, tmp_path / "tokens.parquet")
    cfg = ScoringConfig(num_actors=2, batch_size=8, token_budget=200, chunk_size=32)
    base, ref = model_dirs["llama"]
    out_dir = tmp_path / "scores"
    score = lambda: run_scoring(tokens, base, ref, cfg, out_dir, embedded=True)  # noqa: E731
    _assert_full_run(score(), rows, expected["llama"])
    first = _read_scores(out_dir)
    parts = score_files(out_dir)
    assert len(parts) >= 2, [p.name for p in parts]  # the pool wrote several files
    # A finished stage is skipped: nothing is rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    score()
    assert {p.name: p.stat().st_mtime_ns for p in score_files(out_dir)} == mtimes
    # Simulate a crash: the marker and one part file are gone, another is cut short.
    (out_dir / SUCCESS).unlink()
    lost = pq.read_table(parts[0], columns=["sample_id"])["sample_id"].to_pylist()
    cut = pq.read_table(parts[1], columns=["sample_id"])["sample_id"].to_pylist()
    os.remove(parts[0])
    parts[1].write_bytes(parts[1].read_bytes()[: parts[1].stat().st_size // 2])
    score()
    summary = json.loads((out_dir / SUCCESS).read_text())
    assert summary["rows_scored_this_run"] == len(lost) + len(cut)
    assert summary["rows_skipped"] == len(rows) - len(lost) - len(cut)
    assert summary["tokens_this_run"] == sum(
        len(r["input_ids"]) for r in rows if r["sample_id"] in set(lost + cut))
    after = {p.name: p.stat().st_mtime_ns for p in score_files(out_dir)}
    kept = {k: v for k, v in mtimes.items() if k not in (parts[0].name, parts[1].name)}
    assert {k: after[k] for k in kept} == kept  # untouched
    second = _read_scores(out_dir)
    d = second.to_pydict()
    _assert_matches(d["sample_id"], d["base_loss"], d["ref_loss"], expected["llama"])
    _assert_close_scores(second, first)  # equal to the uninterrupted run within 1e-6


@pytest.mark.ray
def test_ray_scoring_equals_the_bare_scorer(ray_local, tmp_path, model_dirs, rows, expected):
    """The pipeline scores exactly what the bare TokenScorer scores (within 1e-6: the rows a
    batch holds may differ, which changes the last bits only)."""
    tokens = _write_tokens(rows, tmp_path / "tokens.parquet")
    cfg = ScoringConfig(num_actors=2, batch_size=8, token_budget=200, chunk_size=32)
    base, ref = model_dirs["qwen2"]
    table = pq.read_table(tokens).sort_by("sample_id")
    scorer = TokenScorer(base, ref, device="cpu", token_budget=200, chunk_size=32)
    bare = {"sample_id": [], "base_loss": [], "ref_loss": []}
    for s0 in range(0, table.num_rows, 8):
        got = scorer(scoring_stage._table_to_batch(table.slice(s0, 8)))
        for key in bare:
            bare[key].extend(got[key])
    want = pa.table({"sample_id": pa.array(bare["sample_id"], pa.int64()),
                     "base_loss": pa.array([list(x) for x in bare["base_loss"]], pa.list_(pa.float32())),
                     "ref_loss": pa.array([list(x) for x in bare["ref_loss"]], pa.list_(pa.float32()))})
    from ray.data import DataContext

    process_wide = DataContext.get_current()
    before = (process_wide.use_datasource_v2, process_wide.target_max_block_size,
              process_wide.scheduling_strategy, process_wide.enable_progress_bars)
    out = run_scoring(tokens, base, ref, cfg, tmp_path / "scores", embedded=True)
    _assert_full_run(out, rows, expected["qwen2"])
    _assert_close_scores(_read_scores(out), want)
    # The stage's settings lived on its own DataContext copy.
    assert DataContext.get_current() is process_wide
    assert (process_wide.use_datasource_v2, process_wide.target_max_block_size,
            process_wide.scheduling_strategy, process_wide.enable_progress_bars) == before


def test_scored_parts_drop_invalid_and_foreign_parts(tmp_path):
    """What a rerun trusts: readable part files of this corpus; a truncated part and a killed
    writer's temp file are removed, and parts written for other rows are never mixed in."""
    corpus = np.arange(20, dtype=np.int64)
    ScoredParts.reconcile(tmp_path, corpus)
    for name, ids in (("part-a_000000-0", range(0, 8)), ("part-a_000001-0", range(8, 16)),
                      ("part-a_000002-0", range(16, 20))):
        pq.write_table(pa.table({"sample_id": pa.array(ids, pa.int64())}), tmp_path / f"{name}.parquet")
    good = (tmp_path / "part-a_000000-0.parquet").read_bytes()
    (tmp_path / "part-a_000001-0.parquet").write_bytes(good[: len(good) // 2])  # a crash
    temp = tmp_path / "_part-a_000002-0.parquet.77.89abcdef.tmp"
    temp.write_bytes(b"partial")
    done = ScoredParts.reconcile(tmp_path, corpus)
    assert not temp.exists()
    assert [p.name for p in done.files] == ["part-a_000000-0.parquet", "part-a_000002-0.parquet"]
    assert done.sample_ids.tolist() == [*range(0, 8), *range(16, 20)]
    assert scoring_stage._drop_scored(pa.table({"sample_id": pa.array(corpus)}), done.sample_ids
                                      )["sample_id"].to_pylist() == list(range(8, 16))
    # Another corpus (other sample_ids): every part is removed, nothing is trusted.
    assert ScoredParts.reconcile(tmp_path, corpus + 100).files == []
    assert score_files(tmp_path) == []
    with pytest.raises(ValueError, match="sample_id 3 appears more than once"):
        ScoredParts.reconcile(tmp_path, np.array([1, 3, 3]))
