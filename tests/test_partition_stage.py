"""Partition stage: in-memory and distributed paths agree exactly with the method core."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import PartitionConfig
from orchestrator.method.partition import partition_global, partition_per_sample, positive_count
from orchestrator.partition import OUTPUT_FILE, run_partition
from orchestrator.partition.threshold import (
    GlobalCut,
    bracket_from_histogram,
    bracket_members,
    cut_from_bracket,
    histogram_partial,
    sortable_keys,
)


def _corpus(n_samples: int = 45, seed: int = 0) -> list[dict]:
    """Samples with coarse (heavily tied) losses, holes in the response, a noise mask and a
    per-sample noise kind."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_samples):
        length = int(rng.integers(1, 30))
        mask = np.zeros(length, np.int8)
        mask[int(rng.integers(0, length)):] = 1  # sometimes position 0 is "response" too
        if i % 9 == 4:
            mask[:] = 0
        noise = (rng.random(length) < 0.3).astype(np.int8) * mask
        base = rng.integers(0, 6, length).astype(np.float32) * np.float32(0.5)
        # Noise tokens were learned less by the reference: lower score on average.
        ref = base - np.where(noise == 1, -0.5, 0.5).astype(np.float32) * rng.integers(0, 3, length)
        ref = ref.astype(np.float32)
        base[(mask == 0) | (np.arange(length) == 0)] = np.nan
        ref[np.isnan(base)] = np.nan
        kind = ("typo", "filler", "wrong_value")[i % 3] if noise.any() else None
        rows.append({"sample_id": 500 - 7 * i, "input_ids": rng.integers(0, 50, length).astype(np.int32),
                     "response_mask": mask, "noise_mask": noise, "noise_kind": kind,
                     "base_loss": base, "ref_loss": ref})
    return rows


def _write(rows: list[dict], root: Path, score_files: int = 3) -> tuple[Path, Path]:
    tokens = pa.table({
        "sample_id": pa.array([r["sample_id"] for r in rows], pa.int64()),
        "input_ids": pa.array([r["input_ids"] for r in rows], pa.list_(pa.int32())),
        "response_mask": pa.array([r["response_mask"] for r in rows], pa.list_(pa.int8())),
        "noise_mask": pa.array([r["noise_mask"] for r in rows], pa.list_(pa.int8())),
        "noise_kind": pa.array([r["noise_kind"] for r in rows], pa.string()),
        "num_tokens": pa.array([len(r["input_ids"]) for r in rows], pa.int32()),
    })
    tokens_path = root / "tokens.parquet"
    pq.write_table(tokens, tokens_path, row_group_size=10)
    scores_dir = root / "scores"
    scores_dir.mkdir()
    by_id = sorted(rows, key=lambda r: r["sample_id"])
    for b, chunk in enumerate(np.array_split(np.arange(len(by_id)), score_files)):
        part = [by_id[i] for i in chunk]
        pq.write_table(pa.table({
            "sample_id": pa.array([r["sample_id"] for r in part], pa.int64()),
            "base_loss": pa.array([r["base_loss"] for r in part], pa.list_(pa.float32())),
            "ref_loss": pa.array([r["ref_loss"] for r in part], pa.list_(pa.float32())),
        }), scores_dir / f"part-{b:05d}.parquet")
    return tokens_path, scores_dir


def _flat(rows: list[dict]):
    """Independent flattening: sample_id order, response positions >= 1."""
    scores, offsets, noise = [], [0], []
    for r in sorted(rows, key=lambda r: r["sample_id"]):
        sel = (r["response_mask"] == 1) & (np.arange(len(r["input_ids"])) >= 1)
        scores.append(r["base_loss"][sel] - r["ref_loss"][sel])
        noise.append(r["noise_mask"][sel])
        offsets.append(offsets[-1] + int(sel.sum()))
    return np.concatenate(scores).astype(np.float32), np.array(offsets), np.concatenate(noise)


def _classes_by_sample(path: Path) -> dict[int, np.ndarray]:
    t = pq.read_table(path).to_pydict()
    return {sid: np.array(c, np.int8) for sid, c in zip(t["sample_id"], t["token_class"], strict=True)}


def _expected_by_sample(rows: list[dict], classes: np.ndarray) -> dict[int, np.ndarray]:
    out, start = {}, 0
    for r in sorted(rows, key=lambda r: r["sample_id"]):
        sel = (r["response_mask"] == 1) & (np.arange(len(r["input_ids"])) >= 1)
        full = np.zeros(len(r["input_ids"]), np.int8)
        full[sel] = classes[start:start + int(sel.sum())]
        start += int(sel.sum())
        out[r["sample_id"]] = full
    return out


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return _corpus()


# ------------------------------------------------------------- distributed threshold (plain)


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.7, 0.95, 1.0])
def test_two_pass_threshold_equals_core(rho):
    rng = np.random.default_rng(3)
    scores = np.concatenate([
        rng.normal(0, 2, 3000).astype(np.float32),
        np.full(500, 0.25, np.float32),  # a big block of ties
        np.array([0.0, -0.0] * 50, np.float32),  # the two zeros are equal scores
    ])
    rng.shuffle(scores)
    sids = np.repeat(np.arange(0, 360, 3), 30)[: scores.size]
    pos = np.tile(np.arange(30), 120)[: scores.size]
    batches = np.array_split(np.arange(scores.size), 11)
    bracket = bracket_from_histogram([histogram_partial(scores[b]) for b in batches], rho)
    members = [] if bracket.bin < 0 else [
        bracket_members(scores[b], sids[b], pos[b], bracket.bin) for b in batches]
    cut = cut_from_bracket(bracket, members)
    got = np.concatenate([cut.classify(scores[b], sids[b], pos[b]) for b in batches])
    want = partition_global(scores, rho)
    np.testing.assert_array_equal(got, want)
    assert int((got == 1).sum()) == positive_count(scores.size, rho)


def test_sortable_keys_order_like_floats():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
    keys = sortable_keys(x)
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    assert keys[3] == keys[4]  # -0.0 == +0.0
    assert (np.diff(keys.astype(np.int64))[[0, 1, 2, 4, 5, 6]] > 0).all()


def test_global_cut_breaks_ties_by_corpus_order():
    cut = GlobalCut(1.0, 2, (7, 3))
    got = cut.classify(np.array([1.0, 1.0, 1.0, 2.0, 0.5], np.float32), np.array([5, 7, 7, 9, 1]),
                       np.array([9, 3, 4, 0, 0]))
    np.testing.assert_array_equal(got, [1, 1, -1, 1, -1])


# ------------------------------------------------------------------------- stage, in memory


def test_in_memory_global_matches_core(tmp_path, rows):
    tokens, scores = _write(rows, tmp_path)
    report = run_partition(tokens, scores, PartitionConfig(rho=0.7), tmp_path / "out")
    flat, _, noise = _flat(rows)
    want = partition_global(flat, 0.7)
    got = _classes_by_sample(tmp_path / "out" / OUTPUT_FILE)
    assert got.keys() == _expected_by_sample(rows, want).keys()
    for sid, classes in _expected_by_sample(rows, want).items():
        np.testing.assert_array_equal(got[sid], classes, err_msg=f"sample {sid}")
    table = pq.read_table(tmp_path / "out" / OUTPUT_FILE)
    assert table.schema.field("token_class").type == pa.list_(pa.int8())
    assert {"input_ids", "response_mask", "noise_mask", "num_tokens"} <= set(table.column_names)
    assert report["n_positive"] == positive_count(flat.size, 0.7) == int((want == 1).sum())
    assert report["n_tokens"] == flat.size and report["n_samples"] == len(rows)
    assert report["threshold"] == float(np.sort(flat)[::-1][report["n_positive"] - 1])
    assert report["k_ties"] > 1  # the corpus is built to tie at the threshold
    assert 0.5 < report["auroc"] <= 1.0  # noise was built to score lower
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["n_positive"] == report["n_positive"] and "precision" in on_disk
    assert (tmp_path / "out" / "histogram.png").stat().st_size > 1000


def test_nan_at_response_token_names_the_sample(tmp_path, rows):
    bad = [dict(r) for r in rows]
    victim = next(r for r in bad if r["response_mask"][1:].sum() > 0)
    victim["base_loss"] = victim["base_loss"].copy()
    victim["base_loss"][np.flatnonzero(victim["response_mask"][1:])[0] + 1] = np.nan
    tokens, scores = _write(bad, tmp_path)
    with pytest.raises(ValueError, match=f"sample_id {victim['sample_id']}"):
        run_partition(tokens, scores, PartitionConfig(), tmp_path / "out")


def test_missing_scores_names_the_sample(tmp_path, rows):
    tokens, scores = _write(rows, tmp_path, score_files=3)
    first = pq.read_table(scores / "part-00000.parquet")
    pq.write_table(first.slice(1), scores / "part-00000.parquet")
    with pytest.raises(ValueError, match=f"sample_id {first['sample_id'][0].as_py()} has no scores"):
        run_partition(tokens, scores, PartitionConfig(), tmp_path / "out")


# ------------------------------------------------------------------------ stage, distributed


@pytest.mark.ray
@pytest.mark.parametrize("embedded", [False, True], ids=["cluster", "embedded"])
@pytest.mark.parametrize("mode", ["global", "per_sample"])
def test_distributed_path_equals_in_memory(ray_local, tmp_path, rows, mode, embedded, monkeypatch):
    """Also with the embedded instance's settings (`lethe run`'s own Ray): there Ray Data's
    first Parquet reader splits the read into 2 x the cluster's CPUs blocks (45 rows on 4
    CPUs: 6,6,6,6,6,5,5,5), which the classify pass's blocks must not follow."""
    from ray.data import DataContext

    from orchestrator.embedded import EMBEDDED_ENV

    if embedded:
        monkeypatch.setenv(EMBEDDED_ENV, "1")
    else:
        monkeypatch.delenv(EMBEDDED_ENV, raising=False)
    tokens, scores = _write(rows, tmp_path)
    cfg = PartitionConfig(rho=0.7, mode=mode, histogram_bins=20)
    mem = run_partition(tokens, scores, cfg, tmp_path / "mem")
    process_wide = DataContext.get_current()
    before = (process_wide.execution_options.preserve_order, process_wide.enable_progress_bars)
    dist = run_partition(tokens, scores, cfg, tmp_path / "dist", in_memory_max_tokens=0,
                         rows_per_block=7)
    assert mem["path"] == "in_memory" and dist["path"] == "distributed"
    # The classify pass wrote its parts from the workers (Ray Data's writer), into a folder,
    # and left the process-wide DataContext as it found it.
    assert DataContext.get_current() is process_wide
    assert (process_wide.execution_options.preserve_order, process_wide.enable_progress_bars) == before
    parts = sorted((tmp_path / "dist" / OUTPUT_FILE).glob("*.parquet"))
    assert (tmp_path / "dist" / OUTPUT_FILE).is_dir() and len(parts) >= 2, parts
    assert not list((tmp_path / "dist").glob("_*"))  # no temp folder, no statistics left
    ids = pq.read_table(tmp_path / "dist" / OUTPUT_FILE, columns=["sample_id"])["sample_id"]
    # The input's block order (blocks of 7 rows), each block sorted by sample_id (the join).
    given = [r["sample_id"] for r in rows]
    assert ids.to_pylist() == [s for i in range(0, len(given), 7) for s in sorted(given[i:i + 7])]
    assert _classes_by_sample(tmp_path / "dist" / OUTPUT_FILE).keys() == \
        _classes_by_sample(tmp_path / "mem" / OUTPUT_FILE).keys()
    for sid, classes in _classes_by_sample(tmp_path / "mem" / OUTPUT_FILE).items():
        np.testing.assert_array_equal(_classes_by_sample(tmp_path / "dist" / OUTPUT_FILE)[sid],
                                      classes, err_msg=f"sample {sid}")
    for key in ("n_tokens", "n_positive", "n_negative", "threshold", "auroc", "precision",
                "recall", "n_samples", "histogram", "noise_by_kind"):
        assert dist[key] == mem[key], key
    assert list(mem["noise_by_kind"]) == ["filler", "typo", "wrong_value"]
    flat, offsets, _ = _flat(rows)
    want = partition_global(flat, 0.7) if mode == "global" else partition_per_sample(flat, offsets, 0.7)
    assert mem["n_positive"] == int((want == 1).sum())
    if mode == "global":
        assert dist["k_ties"] == mem["k_ties"] > 1
        assert dist["bracket_size"] < flat.size  # pass 2 gathered only the bracket bin


# ------------------------------------------------------------ real packages, end to end


@pytest.mark.ray
def test_synthetic_corpus_scored_and_partitioned(ray_local, tmp_path):
    """data -> models -> scoring (2 actors) -> partition with the real packages' outputs."""
    from orchestrator.config import DataConfig, ModelSpec, ScoringConfig, SyntheticConfig
    from orchestrator.data import corpus_texts, generate_synthetic, prepare_dataset
    from orchestrator.models import load_tokenizer, materialize_base
    from orchestrator.scoring import run_scoring

    synth = generate_synthetic(SyntheticConfig(num_train=40, num_eval=4), tmp_path / "synth")
    spec = ModelSpec(name="tiny", family="llama", tokenizer_vocab_size=400,
                     from_config={"hidden_size": 32, "num_layers": 1, "num_heads": 4,
                                  "num_kv_heads": 2, "intermediate_size": 64})
    base = materialize_base(spec, corpus_texts(synth.train), tmp_path / "base", seed=0)
    ref = materialize_base(spec, corpus_texts(synth.train), tmp_path / "ref", seed=1)
    prepare_dataset(DataConfig(max_seq_len=96), load_tokenizer(spec, base), tmp_path / "data",
                    rows_path=str(synth.train))
    tokens = tmp_path / "data" / "tokens.parquet"
    scores = run_scoring(tokens, base, ref, ScoringConfig(num_actors=2, batch_size=8),
                         tmp_path / "scores")
    report = run_partition(tokens, scores, PartitionConfig(rho=0.7), tmp_path / "part")

    src = pq.read_table(tokens).sort_by("sample_id").to_pydict()
    out = pq.read_table(tmp_path / "part" / OUTPUT_FILE).sort_by("sample_id").to_pydict()
    assert out["sample_id"] == src["sample_id"] and out["input_ids"] == src["input_ids"]
    n_response = 0
    for mask, classes in zip(src["response_mask"], out["token_class"], strict=True):
        trained = (np.array(mask) == 1) & (np.arange(len(mask)) >= 1)
        classes = np.array(classes)
        assert set(np.unique(classes[trained])) <= {-1, 1} and (classes[~trained] == 0).all()
        n_response += int(trained.sum())
    assert report["n_tokens"] == n_response > 0
    assert report["n_positive"] == positive_count(n_response, 0.7)
    assert report["n_noise"] > 0 and report["auroc"] is not None  # synthetic noise is known
