"""The pipeline's stages, each cached by a content hash of what determines its result.

Every function here takes plain config objects, returns the stage's output location, and
skips work whose `_SUCCESS.json` already exists. A stage's key is built from the keys of the
stages it reads plus the config fields that change its numbers; resource fields (actor and
worker counts, CPUs, GPUs, batch sizes that only change scheduling) are left out, so moving
a run from a laptop to a cluster reuses its scores. Changing `partition.rho` therefore gives a
new partition key and new training keys, but the scoring key stays the same.

Every stage here is opened through this module's `_open` (`lethe plan` swaps it for a
read-only look-up, pipeline/plan.py). `StageOut` and the readers of finished stages'
records live in pipeline/stage_outputs.py and are re-exported here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cache import Stage, path_fingerprint
from orchestrator.config import ExperimentConfig, ModelSpec
from orchestrator.logs import stage_key_line
from orchestrator.pipeline.stage_outputs import (
    StageOut,
    _spec_of,
    base_revision,
    find_done,
    model_path,
    partition_report,
    pinned_spec,
    scores_path,
    scoring_summary,
    stage_metrics,
    stage_summary,
    stages_root,
)

__all__ = [
    "StageOut", "TrainRequest", "_open", "_spec_of", "base_built", "base_inputs",
    "base_revision", "base_stage", "find_done", "model_path", "partition_report",
    "partition_stage", "pinned_spec", "reference_stage", "score_stage", "scores_path",
    "scoring_summary", "stage_metrics", "stage_summary", "stages_root", "tokens_stage",
    "train_stage", "train_stages",
]

_BASE_BUILD_LOCK = threading.Lock()

# Config fields that only change scheduling or resources, never the numbers produced.
_SCORING_RESOURCE_FIELDS = {"num_actors", "min_actors", "num_gpus_per_actor",
                            "num_cpus_per_actor", "batch_size", "token_budget", "packing",
                            "scheduling_strategy"}
_TRAIN_RESOURCE_FIELDS = {"methods", "use_gpu", "cpus_per_worker", "gpus_per_worker",
                          "checkpoint_every", "checkpoint_every_minutes", "max_failures",
                          "gradient_checkpointing", "placement_strategy"}


def _without(d: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in fields}


def _open(cfg: ExperimentConfig, name: str, inputs: dict[str, Any]) -> tuple[Stage, bool]:
    """The stage named by `inputs`, whether it is already done; locked for this run and
    prepared when it is not (a run that holds it elsewhere is waited for, then re-checked)."""
    st = Stage(stages_root(cfg), name, inputs)
    cached = st.open()
    print(stage_key_line(name, st.key, "cached" if cached else "running"), flush=True)
    return st, cached


def _train_into(st: Stage, session: Any = None, **job_fields: Any) -> None:
    """Run one training job whose checkpoints and export live in the stage's folder: in its
    own Ray Train run, or fed to the family's running `session` (training/session.py)."""
    from orchestrator.training import TrainJob, run_training

    job = TrainJob(output_dir=str(st.dir / "run"), storage_path=str(st.dir / "ray"), **job_fields)
    result = session.train([job])[0] if session is not None else run_training(job)
    st.mark_done({"model_path": result.export_dir, "metrics": result.metrics})


# ------------------------------------------------------------------------------- base


def base_inputs(cfg: ExperimentConfig, spec: ModelSpec, rows_ident: Any) -> dict[str, Any]:
    """What names a base stage: the spec and the model's identity (a local path's content,
    a hub id and revision, a GGUF file's content) or, for a model built from config, the
    corpus its tokenizer is trained on and the seed."""
    if spec.pretrained is not None:
        p = Path(spec.pretrained)
        ident = path_fingerprint(p) if p.exists() else {"hub": spec.pretrained, "rev": spec.revision}
        return {"spec": spec.model_dump(mode="json"), "ident": ident}
    if spec.gguf is not None:
        from orchestrator.models.gguf import gguf_fingerprint

        return {"spec": spec.model_dump(mode="json"), "gguf": gguf_fingerprint(spec)}
    return {"spec": spec.model_dump(mode="json"), "corpus": rows_ident, "seed": cfg.seed}


def base_built(cfg: ExperimentConfig, spec: ModelSpec, rows_ident: Any) -> bool:
    """Whether the base stage is already done (looked up, not locked or built)."""
    if spec.pretrained is not None:
        from orchestrator.pipeline.preflight import check_pretrained_path

        check_pretrained_path(spec)
    return Stage(stages_root(cfg), "base", base_inputs(cfg, spec, rows_ident)).done()


def base_stage(cfg: ExperimentConfig, spec: ModelSpec, rows_path: str, rows_ident: Any) -> StageOut:
    """The base model: a tiny model built from config (+ locally trained tokenizer), a GGUF
    file de-quantized into a plain HF folder, or a pretrained model used in place (then
    this stage only records its identity)."""
    from orchestrator.data import corpus_texts
    from orchestrator.models import materialize_base

    if spec.pretrained is not None:
        from orchestrator.pipeline.preflight import check_pretrained_path

        check_pretrained_path(spec)  # a missing local path is not a hub id
        st, cached = _open(cfg, "base", base_inputs(cfg, spec, rows_ident))
        if not cached:
            (st.dir / "model_path.txt").write_text(spec.pretrained)
            summary = {"model_path": spec.pretrained}
            if not Path(spec.pretrained).exists():  # a hub id: the commit it resolves to on first use
                from orchestrator.models.loading import resolve_revision

                summary["revision"] = resolve_revision(spec.pretrained, spec.revision)
            st.mark_done(summary)
        return StageOut(st.key, st.dir, cached)
    if spec.gguf is not None:
        # De-quantized once, keyed by the file's content: downstream reads a plain HF folder.
        st, cached = _open(cfg, "base", base_inputs(cfg, spec, rows_ident))
        if not cached:
            materialize_base(spec, [], st.dir / "model")
            st.mark_done({"model_path": str(st.dir / "model")})
        return StageOut(st.key, st.dir, cached)
    st, cached = _open(cfg, "base", base_inputs(cfg, spec, rows_ident))
    if not cached:
        model_dir = st.dir / "model"
        from orchestrator.pipeline.source_stages import synthetic_stage

        synthetic_dir = synthetic_stage(cfg).dir if spec.warmup is not None else None
        # One family at a time in this process: loading a model patches module construction
        # process-wide (meta-device init), which breaks a warm-up backward running in another
        # family's thread ("expected device meta but got cpu"), and the warm-up's seeded RNG
        # is the process's.
        with _BASE_BUILD_LOCK:
            corpus = corpus_texts(rows_path, cfg.data.split, cfg.data.columns, cfg.data.roles)
            materialize_base(spec, corpus, model_dir, seed=cfg.seed)
            summary: dict[str, Any] = {"model_path": str(model_dir)}
            if spec.warmup is not None:  # clean synthetic text; held-out questions kept out
                from orchestrator.models.warmup import warm_up_base

                summary["warmup"] = warm_up_base(spec, model_dir, cfg.data.synthetic,
                                                 synthetic_dir, cfg.data.max_seq_len)
        st.mark_done(summary)
    return StageOut(st.key, st.dir, cached)


def tokens_stage(cfg: ExperimentConfig, base: StageOut, rows_path: str, rows_ident: Any,
                 split: str) -> StageOut:
    """Chat-format and tokenize the rows with the base model's tokenizer."""
    from orchestrator.data import prepare_dataset
    from orchestrator.models import load_tokenizer

    data_cfg = cfg.data.model_dump(mode="json")
    data_cfg.pop("synthetic")
    data_cfg.pop("revision")  # the commit it resolved to is in rows_ident (source_rows)
    for unset in ("columns", "roles"):  # absent = the layouts' own names: keys stay as before
        if data_cfg.get(unset) is None:
            data_cfg.pop(unset, None)
    if data_cfg.get("limit") is None:  # the sample's seed / strata mean nothing without a limit
        data_cfg.pop("limit_seed", None)
        data_cfg.pop("stratify_by", None)
    st, cached = _open(cfg, "tokens", {"data": data_cfg, "rows": rows_ident, "split": split,
                                            "tokenizer": base.key})
    if not cached:
        spec = _spec_of(base)
        tok = load_tokenizer(spec, model_path(base))
        from orchestrator.pipeline.preflight import check_vocabulary

        check_vocabulary(spec, model_path(base), tok)  # before any row, before the reference
        report = prepare_dataset(cfg.data, tok, st.dir, rows_path=rows_path)
        st.mark_done({"tokens_path": str(st.dir / "tokens.parquet"),
                      "report": getattr(report, "__dict__", {})})
    return StageOut(st.key, st.dir, cached)


# ----------------------------------------------------------------------------- training


def _train_cfg_for_key(cfg: ExperimentConfig, **updates: Any) -> dict[str, Any]:
    train = cfg.train.model_copy(update=updates).model_dump(mode="json", by_alias=True)
    out = _without(train, _TRAIN_RESOURCE_FIELDS)
    if out.get("deepspeed"):
        out["deepspeed"] = _deepspeed_ident(out["deepspeed"])
    return out


def _deepspeed_ident(path: str) -> Any:
    """The DeepSpeed JSON by content: editing the file retrains, moving it does not."""
    from orchestrator.training.deepspeed_setup import resolve_config_path

    try:
        return {"deepspeed_json": path_fingerprint(resolve_config_path(path))["sha256"]}
    except FileNotFoundError:  # training reports the missing file with its paths
        return path


def reference_stage(cfg: ExperimentConfig, spec: ModelSpec, base: StageOut, tokens: StageOut,
                    valid: StageOut | None, mlflow_target: Any = None,
                    session: Any = None) -> StageOut:
    """The reference model: the base after plain SFT on a seeded random subset of the pool."""
    from orchestrator.training import SubsetSpec

    ref = cfg.reference
    updates: dict[str, Any] = {"methods": ["sft"]}
    if ref.lr is not None:
        updates["lr"] = ref.lr
    if ref.epochs is not None:
        updates["epochs"] = ref.epochs
    if ref.lora is not None:
        updates["lora"] = ref.lora
    train = cfg.train.model_copy(update=updates)
    subset = SubsetSpec(fraction=None if ref.subset_size else ref.subset_fraction,
                        size=ref.subset_size, seed=ref.seed)
    inputs = {"base": base.key, "tokens": tokens.key, "subset": subset.__dict__,
              "train": _train_cfg_for_key(cfg, **updates)}
    if ref.subset_source != "random":  # absent for the paper's default: its keys are unchanged
        inputs["subset_source"] = ref.subset_source
    st, cached = _open(cfg, "reference", inputs)
    if not cached:
        train_path = str(tokens.dir / "tokens.parquet")
        if ref.subset_source == "clean":
            from orchestrator.data.trusted import write_clean_rows

            train_path = str(st.dir / "clean_rows.parquet")
            n_clean, n_pool = write_clean_rows(tokens.dir / "tokens.parquet", train_path)
            size = ref.subset_size or max(1, round((ref.subset_fraction or 1.0) * n_pool))
            if size > n_clean:
                raise ValueError(f"reference: {size} clean rows requested, the pool has "
                                 f"{n_clean} clean of {n_pool}; lower reference.subset_fraction")
            subset = SubsetSpec(size=size, seed=ref.seed)
        _train_into(
            st, session=session, train_path=train_path, base_model_path=model_path(base),
            model=pinned_spec(spec, base), train=train, method="sft",
            class_column="response_mask",
            run_name=f"reference-{st.key}", subset=subset,
            validation_path=str(valid.dir / "tokens.parquet") if valid else None,
            mlflow=mlflow_target,
        )
    return StageOut(st.key, st.dir, cached)


def score_stage(cfg: ExperimentConfig, base: StageOut, reference: StageOut,
                tokens: StageOut) -> StageOut:
    """Per-token losses of base and reference on every response token (Ray Data actors)."""
    from orchestrator.scoring import run_scoring

    scoring = _without(cfg.scoring.model_dump(mode="json"), _SCORING_RESOURCE_FIELDS)
    st, cached = _open(cfg, "scores", {"base": base.key, "reference": reference.key,
                                            "tokens": tokens.key, "scoring": scoring})
    if not cached:
        # run_scoring resumes block by block inside its own folder when it was killed.
        out = run_scoring(tokens.dir / "tokens.parquet", model_path(base), model_path(reference),
                          cfg.scoring, st.dir / "scores",
                          trust_remote_code=_spec_of(base).trust_remote_code,
                          attn_implementation=_spec_of(base).attn_implementation,
                          base_revision=base_revision(base))
        st.mark_done({"scores_path": str(out)})
    return StageOut(st.key, st.dir, cached)


def partition_stage(cfg: ExperimentConfig, tokens: StageOut, scores: StageOut) -> StageOut:
    """Global rho threshold over every response token -> token_class column + report."""
    from orchestrator.partition import run_partition

    st, cached = _open(cfg, "partition", {"scores": scores.key, "tokens": tokens.key,
                                               "partition": cfg.partition.model_dump(mode="json")})
    if not cached:
        report = run_partition(tokens.dir / "tokens.parquet", scores_path(scores), cfg.partition,
                               st.dir)
        st.mark_done({"report": report})
    return StageOut(st.key, st.dir, cached)


@dataclass(frozen=True)
class TrainRequest:
    """One (method, seed) fine-tuning of a model family. `data` is the partition stage for
    ignore / forget, the tokens stage for sft (whose key therefore does not depend on rho)."""

    data: StageOut
    method: str
    seed: int
    mlflow_target: Any = None
    callbacks: tuple[Any, ...] = ()
    train_overrides: tuple[tuple[str, Any], ...] = ()


def train_stage(cfg: ExperimentConfig, spec: ModelSpec, base: StageOut, data: StageOut,
                valid: StageOut | None, method: str, seed: int, mlflow_target: Any = None,
                callbacks: list[Any] | None = None, train_overrides: dict[str, Any] | None = None,
                ) -> StageOut:
    """Fine-tune the base with one objective (one cached stage, one Ray Train run)."""
    req = TrainRequest(data, method, seed, mlflow_target, tuple(callbacks or ()),
                       tuple((train_overrides or {}).items()))
    return train_stages(cfg, spec, base, valid, [req])[0]


def train_stages(cfg: ExperimentConfig, spec: ModelSpec, base: StageOut, valid: StageOut | None,
                 requests: list[TrainRequest], session: Any = None) -> list[StageOut]:
    """Fine-tune the base once per request: each request is its own cached stage, and the
    uncached ones train one after the other in ONE Ray Train run (one worker group start-up
    for all of a family's methods x seeds) -- the family's `session` when one is running,
    which its reference already used."""
    from orchestrator.cache import content_hash
    from orchestrator.training import TrainJob, run_trainings

    opened: list[tuple[Stage, bool, TrainRequest]] = []
    jobs: list[TrainJob] = []
    for req in requests:
        updates = {"seed": req.seed, **dict(req.train_overrides)}
        parquet = req.data.dir / ("tokens.parquet" if req.method == "sft" else "partitioned.parquet")
        inputs = {"base": base.key, "data": req.data.key, "method": req.method,
                  "train": _train_cfg_for_key(cfg, **updates)}
        if req.method == "sft":  # lambda / negative term do not touch plain SFT
            inputs["train"].pop("lambda")
            inputs["train"].pop("negative_term")
        st, cached = _open(cfg, "train", inputs)
        opened.append((st, cached, req))
        if cached:
            continue
        jobs.append(TrainJob(
            output_dir=str(st.dir / "run"), storage_path=str(st.dir / "ray"),
            train_path=str(parquet), base_model_path=model_path(base),
            model=pinned_spec(spec, base),
            train=cfg.train.model_copy(update=updates), method=req.method,
            class_column="response_mask" if req.method == "sft" else "token_class",
            run_name=f"{spec.name}-{req.method}-s{req.seed}-{st.key}",
            validation_path=str(valid.dir / "tokens.parquet") if valid else None,
            mlflow=req.mlflow_target, callbacks=list(req.callbacks),
        ))
    if jobs:
        if session is not None:
            results = iter(session.train(jobs))
        else:
            if len(jobs) == 1:
                name, storage = jobs[0].run_name, jobs[0].storage_path
            else:  # a name of its own, stable over reruns, for the shared worker group
                group = content_hash(sorted(j.run_name for j in jobs))
                name = f"{spec.name}-train-group-{group}"
                storage = str(stages_root(cfg) / "train-groups" / group)
            results = iter(run_trainings(jobs, run_name=name, storage_path=storage))
        for st, cached, _ in opened:
            if not cached:
                result = next(results)
                st.mark_done({"model_path": result.export_dir, "metrics": result.metrics})
    return [StageOut(st.key, st.dir, cached) for st, cached, _ in opened]
