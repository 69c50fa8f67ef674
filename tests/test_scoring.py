"""TokenScorer (plain) and the Ray actor scoring stage against a one-sample-at-a-time loop."""

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
from orchestrator.scoring.blocks import BlockPlan, BlockRead, CorpusLayout, read_block

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
    return pa.concat_tables([pq.read_table(p) for p in score_files(out_dir)])


def _assert_full_run(out: Path, rows: list[dict], exp: dict) -> None:
    """A finished stage's output equals the plain loop's losses: schema, order, summary."""
    table = _read_scores(out)
    assert table.schema.field("base_loss").type == pa.list_(pa.float32())
    assert table.column_names == ["sample_id", "base_loss", "ref_loss"]
    d = table.to_pydict()
    _assert_matches(d["sample_id"], d["base_loss"], d["ref_loss"], exp)
    assert d["sample_id"] == sorted(d["sample_id"])
    summary = json.loads((out / SUCCESS).read_text())
    assert summary["blocks"] == 3 and summary["blocks_computed"] == 3
    assert summary["tokens_this_run"] == sum(len(r["input_ids"]) for r in rows)
    assert 0.0 < summary["padding_waste"] < 1.0


# Each family goes through the Ray stage once: gpt_neo here, llama in the resume test's first
# run, qwen2 in the bit-equality test's direct run (a stage run costs two actor start-ups).
@pytest.mark.ray
def test_ray_scoring_matches_loop(ray_local, tmp_path, model_dirs, rows, expected):
    tokens = _write_tokens(rows, tmp_path / "tokens.parquet")
    cfg = ScoringConfig(num_actors=2, batch_size=8, token_budget=200, chunk_size=32)
    base, ref = model_dirs["gpt_neo"]
    out = run_scoring(tokens, base, ref, cfg, tmp_path / "scores", block_rows=16)
    _assert_full_run(out, rows, expected["gpt_neo"])


@pytest.mark.ray
def test_ray_scoring_resumes_missing_block_only(ray_local, tmp_path, model_dirs, rows, expected):
    tokens = _write_tokens(rows, tmp_path / "tokens.parquet")
    cfg = ScoringConfig(num_actors=2, batch_size=8, token_budget=200, chunk_size=32)
    base, ref = model_dirs["llama"]
    out_dir = tmp_path / "scores"
    _assert_full_run(run_scoring(tokens, base, ref, cfg, out_dir, block_rows=16), rows,
                     expected["llama"])
    parts = score_files(out_dir)
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    # A finished stage is skipped: nothing is rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    run_scoring(tokens, base, ref, cfg, out_dir, block_rows=16)
    assert {p.name: p.stat().st_mtime_ns for p in score_files(out_dir)} == mtimes
    # Simulate a crash after two blocks: the marker and one part file are gone.
    (out_dir / SUCCESS).unlink()
    lost = parts[1].name
    os.remove(parts[1])
    run_scoring(tokens, base, ref, cfg, out_dir, block_rows=16)
    summary = json.loads((out_dir / SUCCESS).read_text())
    assert summary["blocks_computed"] == 1 and summary["blocks_skipped"] == 2
    after = {p.name: p.stat().st_mtime_ns for p in score_files(out_dir)}
    assert {k for k in after if after[k] != mtimes.get(k)} == {lost}
    rows_in_block1 = sorted(r["sample_id"] for r in rows)[16:32]
    assert summary["tokens_this_run"] == sum(
        len(r["input_ids"]) for r in rows if r["sample_id"] in rows_in_block1)
    d = _read_scores(out_dir).to_pydict()
    _assert_matches(d["sample_id"], d["base_loss"], d["ref_loss"], expected["llama"])


def _blockwise_bare(tokens: Path, base: str, ref: str, block_rows: int, batch_size: int,
                    **kwargs) -> dict[str, np.ndarray]:
    """What the stage must compute: the bare scorer on each block's rows in sample_id order,
    in calls of batch_size rows (the composition of a micro-batch can change the last bits)."""
    table = pq.read_table(tokens).sort_by("sample_id")
    scorer = TokenScorer(base, ref, device="cpu", **kwargs)
    out = {"sample_id": [], "base_loss": [], "ref_loss": []}
    # One thread, like an actor with num_cpus=1: another thread count may split a reduction
    # differently and change the last bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b0 in range(0, table.num_rows, block_rows):
            block = table.slice(b0, block_rows)
            for s0 in range(0, block.num_rows, batch_size):
                got = scorer(scoring_stage._table_to_batch(block.slice(s0, batch_size)))
                for key in out:
                    out[key].extend(got[key])
    finally:
        torch.set_num_threads(threads)
    return out


def _assert_bit_equal(table: pa.Table, want: dict) -> None:
    d = table.to_pydict()
    assert d["sample_id"] == [int(s) for s in want["sample_id"]]
    for key in ("base_loss", "ref_loss"):
        for sid, got, exp in zip(d["sample_id"], d[key], want[key], strict=True):
            np.testing.assert_array_equal(np.asarray(got, np.float32), exp, err_msg=f"{key} {sid}")


@pytest.mark.ray
def test_ray_scoring_is_bit_equal_to_bare_scorer_direct_and_staged(ray_local, tmp_path, model_dirs,
                                                                   rows, expected, monkeypatch):
    """Actors write the parts themselves; the scores are exactly the bare scorer's, whether
    blocks are read straight from the input or through the staging pass."""
    tokens = _write_tokens(rows, tmp_path / "tokens.parquet")
    cfg = ScoringConfig(num_actors=2, batch_size=8, token_budget=200, chunk_size=32)
    base, ref = model_dirs["qwen2"]
    want = _blockwise_bare(tokens, base, ref, 16, 8, token_budget=200, chunk_size=32)
    direct = run_scoring(tokens, base, ref, cfg, tmp_path / "direct", block_rows=16)
    _assert_full_run(direct, rows, expected["qwen2"])
    monkeypatch.setattr(scoring_stage, "DIRECT_READ_MAX_EXTRA_BYTES", -1)
    staged = run_scoring(tokens, base, ref, cfg, tmp_path / "staged", block_rows=16)
    for out, was_staged in ((direct, False), (staged, True)):
        summary = json.loads((out / SUCCESS).read_text())
        assert summary["staged"] is was_staged and summary["blocks_computed"] == 3
        assert not list(out.glob("_*.tmp")) and not (out / "_inputs").exists()
        _assert_bit_equal(_read_scores(out), want)


def test_block_reads_cover_each_block_once(tmp_path, rows):
    tokens = _write_tokens(rows, tmp_path / "tokens.parquet")  # shuffled, row groups of 16
    layout = CorpusLayout.read(tokens)
    plan = BlockPlan.create(layout.sample_ids, 16)
    reads, decoded = layout.direct_reads(plan, list(range(plan.num_blocks)))
    ordered = sorted(r["sample_id"] for r in rows)
    for spec in reads:
        table = read_block(spec)
        assert table["sample_id"].to_pylist() == ordered[spec.block * 16 : spec.block * 16 + 16]
    # Shuffled storage: every block needs every row group, so the whole file is decoded 3 times.
    assert decoded == 3 * int(layout.group_bytes.sum())
    bad = BlockRead(1, 17, reads[1].lo, reads[1].hi, reads[1].sources)
    with pytest.raises(RuntimeError, match="scoring block 1: read 16 rows .* expected 17"):
        read_block(bad)


def test_write_atomic_leaves_no_temp_file(tmp_path):
    table = pa.table({"sample_id": pa.array([1, 2], pa.int64())})
    scoring_stage.write_atomic(table, tmp_path / "part-00000.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]
    assert pq.read_table(tmp_path / "part-00000.parquet").equals(table)
