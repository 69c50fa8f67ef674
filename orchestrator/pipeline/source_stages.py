"""Where the training rows come from: the synthetic corpus, a hub dataset's pinned commit,
and the validation split. These stages come before every model family's chain; their
identity (`source_rows`) enters every downstream key. Cached like the other stages
(pipeline/stages.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from orchestrator.cache import path_fingerprint
from orchestrator.config import ExperimentConfig
from orchestrator.pipeline import stages as S
from orchestrator.pipeline.stages import StageOut

log = logging.getLogger("lethe.pipeline")

# Stages are opened through `S._open`, never a copy of it: `lethe plan` swaps that one
# function for a read-only look-up (pipeline/plan.py).


def synthetic_stage(cfg: ExperimentConfig) -> StageOut:
    """Generate the synthetic noisy corpus (embedded default)."""
    from orchestrator.data import generate_synthetic

    st, cached = S._open(cfg, "synthetic", {"synthetic": cfg.data.synthetic.model_dump(mode="json")})
    if not cached:
        generate_synthetic(cfg.data.synthetic, st.dir)
        st.mark_done()
    return StageOut(st.key, st.dir, cached)


def source_rows(cfg: ExperimentConfig, synthetic: StageOut | None) -> tuple[str, str | None, Any]:
    """(training rows path, validation rows path or None, identity for cache keys).

    With `train.validation_size` > 0 every source gets a validation split, recorded in the
    identity (so in every downstream key) by a "sample" stage: a source without one holds
    out that many seeded random rows (stratified like data.limit's sample, never in the
    training sample); the synthetic clean split is capped at that many rows. The paths it
    returns are then selection files (orchestrator/data/sampling.py).
    """
    from orchestrator.data import sampling

    d, vsize = cfg.data, cfg.train.validation_size
    if d.source == "synthetic":
        assert synthetic is not None
        train, valid = str(synthetic.dir / "train.jsonl"), str(synthetic.dir / "clean_valid.jsonl")
        if not vsize:
            return train, valid, {"synthetic": synthetic.key}
        st, cached = S._open(cfg, "sample", {"synthetic": synthetic.key, "validation_size": vsize,
                                             "seed": d.limit_seed})
        out = st.dir / f"valid{sampling.SELECTION_SUFFIX}"
        if not cached:
            from orchestrator.data.loading import iter_path_rows

            n = sampling.materialize_subset(lambda: iter_path_rows(valid), {"rows_path": valid},
                                            out, size=vsize, seed=d.limit_seed)
            st.mark_done({"valid": n})
        return train, str(out), {"synthetic": synthetic.key, "sample": st.key}
    path = d.path
    assert path is not None
    if Path(path).exists():
        if d.revision is not None:
            from orchestrator.data.errors import DataError

            raise DataError(f"data.revision={d.revision!r}, but data.path {path!r} is local: "
                            "local data is keyed by its content; remove data.revision")
        if d.data_files is not None:
            from orchestrator.data.errors import DataError

            raise DataError(f"data.data_files={d.data_files!r}, but data.path {path!r} is "
                            "local: set data.path to the file itself (data.source 'file')")
        ident: dict[str, Any] = path_fingerprint(path)
    else:
        ident = {"dataset": path, "split": d.split}
        if d.source == "hf":  # a hub name: every reader of the rows path loads its commit
            from orchestrator.data.loading import hub_data_files, hub_ref, split_hub_ref

            name, requested = split_hub_ref(path, d.revision)  # also `hf://datasets/<name>@<rev>`
            revision = dataset_revision(cfg, name, requested) or requested  # a branch: unresolved
            files = d.data_files or hub_data_files(path)  # one file of the repository
            ident["dataset"] = name
            if files is not None:
                ident["data_files"] = files
            if revision is not None:
                ident["revision"] = revision
            path = hub_ref(name, revision, files)
    if not vsize:
        return path, None, ident  # data.limit is sampled while tokenizing (loading.py)
    inputs = {"rows": ident, "split": d.split, "limit": d.limit, "limit_seed": d.limit_seed,
              "stratify_by": d.stratify_by, "validation_size": vsize}
    st, cached = S._open(cfg, "sample", inputs)
    if not cached:
        from orchestrator.data.loading import iter_source_rows

        whole = d.model_copy(update={"limit": None, "path": path})
        report = sampling.materialize_split(
            lambda: (row for _, row in iter_source_rows(whole)),
            {"source": d.source, "path": path, "split": d.split}, st.dir, limit=d.limit,
            validation_size=vsize, seed=d.limit_seed, stratify_by=d.stratify_by)
        st.mark_done({"report": report})
    return (str(st.dir / f"train{sampling.SELECTION_SUFFIX}"),
            str(st.dir / f"valid{sampling.SELECTION_SUFFIX}"), {"sample": st.key})


def dataset_revision(cfg: ExperimentConfig, name: str, requested: str | None) -> str | None:
    """The commit hub dataset `name` (at revision `requested`, None = the default branch)
    resolved to on first use in this run directory, None when it cannot be resolved (offline
    and not in the local cache).

    Recorded by a stage of its own ("dataset", keyed by the name and the requested revision,
    the commit in its `_SUCCESS.json`) like a hub model's commit in its base stage: it must be
    known before any data key is computed, the stage lock makes two runs starting at once
    agree on one commit, and a later run finds the record instead of asking the hub again,
    so a branch that moves changes nothing. An unresolved name is not recorded (a later run
    that can reach the hub or the cache pins it; until then keys carry no commit).
    """
    st, cached = S._open(cfg, "dataset", {"dataset": name, "revision": requested})
    if cached:
        return st.summary().get("revision") if st.done() else None  # (plan: looked up only)
    from orchestrator.data.loading import resolve_dataset_revision

    commit = resolve_dataset_revision(name, requested)
    if commit is None:
        st.release()
        log.warning("hub dataset %r (revision %s) could not be resolved to a commit (offline and "
                    "not in the local Hugging Face cache?): loaded unpinned", name,
                    requested or "default branch")
        return None
    st.mark_done({"dataset": name, "requested": requested, "revision": commit})
    return commit
