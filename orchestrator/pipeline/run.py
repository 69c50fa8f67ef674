"""The pipeline end to end, as one Ray program.

    data -> base -> tokens -> reference -> score -> partition -> train (sft | ignore | forget)
         -> evaluate -> track -> compare

Each model family runs its own chain; chains (and the trainings inside one chain) can run
side by side (`ray.max_parallel_models`, `ray.max_parallel_trainings`). Every stage is
cached by content hash (orchestrator/pipeline/stages.py), so a rerun only does what is
missing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.config import ExperimentConfig, ModelSpec
from orchestrator.masking import mask_secrets
from orchestrator.names import Until
from orchestrator.pipeline import stages as S
from orchestrator.pipeline import timeline
from orchestrator.pipeline.tracking_glue import PipelineTracking
from orchestrator.pipeline.upstream import Source, source, upstream

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class ModelOutcome:
    """What one model family's chain produced."""

    spec: ModelSpec
    partition_report: dict[str, Any] = field(default_factory=dict)
    # (method, seed) -> exported model directory
    models: dict[tuple[str, int], str] = field(default_factory=dict)
    train_metrics: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    base_model: str = ""
    base_revision: str | None = None  # the commit a hub id resolved to (base stage)


def run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run_dir).resolve() / cfg.name


# Ray Train services a single machine does not need, each a process (or a callback's worth
# of work) per training run: the preemption watcher (it polls for nodes being drained, as
# spot instances are) and the Prometheus metrics callbacks. Set only for the embedded
# instance, and only where the user has not set them.
# LETHE_EMBEDDED_RAY: see training/ray_entry.py (no placement-group cleaner actor).
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                       "LETHE_EMBEDDED_RAY": "1"}


def init_ray(cfg: ExperimentConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray Train's controller polls its workers this often; a worker's report waits for the
    # poll, so the 2 s default dominates short runs.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    forwarded = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM",
                 "MLFLOW_TRACKING_URI")
    from orchestrator.embedded import OFFLINE_ENV
    from orchestrator.logs import ray_runtime_env

    quiet = ray_runtime_env()  # no progress bars in workers when stdout is not a terminal
    env = {**{k: os.environ[k] for k in forwarded if k in os.environ}, **quiet.get("env_vars", {})}
    hook = {k: v for k, v in quiet.items() if k != "env_vars"}
    if cfg.ray.address and cfg.ray.address != "local":
        from orchestrator.pipeline.credentials import credential_env, describe

        # A remote cluster's workers never see this shell: gated models, an authenticated
        # MLflow server and S3 need the credentials there. Names are printed, never values.
        creds = credential_env()
        print(f"[lethe] ray.address={cfg.ray.address}: {describe(creds)}", flush=True)
        # Offline switches belong to the embedded instance (orchestrator/embedded.py): the
        # cluster reads the hub whatever this shell says.
        env = {k: v for k, v in env.items() if k not in OFFLINE_ENV}
        ray.init(address=cfg.ray.address, runtime_env={"env_vars": {**env, **creds}, **hook})
    elif os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit`: the job's runtime env (cluster/runtime_env*.yaml) is the
        # one source of env vars; Ray refuses a driver env that repeats its keys.
        ray.init()
    else:
        # The embedded instance: address="local" always starts a fresh one; a bare ray.init()
        # would join any Ray head already running on this machine (its resources, its env).
        for name, value in LOCAL_RAY_TRAIN_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.dashboard,
                 dashboard_host="127.0.0.1", runtime_env={"env_vars": env, **hook})
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        short = local_gpu_shortfall(cfg, gpus)
        if short:
            ray.shutdown()
            from orchestrator.config import ConfigError

            raise ConfigError(f"the config asks for GPUs, but the embedded Ray instance sees "
                              f"{gpus:g}: " + "; ".join(short) + ". Set those fields to 0 / "
                              "false to run on CPU, or give ray.address of a cluster with GPUs")


def local_gpu_shortfall(cfg: ExperimentConfig, gpus: float) -> list[str]:
    """The GPU asks the embedded instance cannot place, each naming its config field. It has
    no autoscaler, so such a stage would wait for GPUs forever instead of failing (a cluster
    may add GPU nodes on demand: there the wait is right, and `lethe plan` reports it)."""
    import dataclasses

    from orchestrator.pipeline.plan import placement_problems, stage_asks

    # GPU only: CPU and memory are not this check's business.
    asks = [dataclasses.replace(a, each={"GPU": a.each["GPU"]})
            for a in stage_asks(cfg) if a.each.get("GPU", 0.0) > 0]
    return placement_problems(asks, {"GPU": gpus}, [])


class TrainingSlots:
    """Caps how many Ray Train runs are in flight at once, across the model families:
    `ray.max_training_runs` (the config's cap, never a snapshot of the cluster's resources
    taken at start; a cluster that autoscales from zero GPU nodes has none then).

    A run reserves its workers' CPUs / GPUs for as long as it lives, and a family's CPU
    training session lives through its scoring: runs beyond what the cluster can hold at
    once would wait in Ray's queue while holding back the scoring actors and evaluation
    workers of the other families. Within the cap, Ray's own queueing places each run when
    its resources are there.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.size = cfg.ray.max_training_runs
        self._sem = threading.BoundedSemaphore(self.size)

    def __enter__(self) -> TrainingSlots:
        self._sem.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sem.release()


def _parallel(fn: Callable[[T], R], items: list[T], workers: int) -> list[R]:
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _seeds(cfg: ExperimentConfig) -> list[int]:
    return list(cfg.seeds) if cfg.seeds else [cfg.train.seed]


def _model_chain(cfg: ExperimentConfig, spec: ModelSpec, src: Source, until: Until | None,
                 track: PipelineTracking, slots: TrainingSlots) -> ModelOutcome:
    """One family's stages; with a training session (pipeline/sessions.py) its reference and
    its method x seed jobs share one Ray Train run, which holds a training slot throughout."""
    from orchestrator.pipeline.sessions import family_session, wants_session

    if not wants_session(cfg, until):
        out = _family_stages(cfg, spec, src, until, track, slots, None)
    else:
        with slots, family_session(cfg, spec, src.ident, until) as session:
            out = _family_stages(cfg, spec, src, until, track, contextlib.nullcontext(), session)
    if until in (None, "evaluate") and cfg.evaluate.enabled and len(cfg.models) > 1:
        # After the session is closed, so its CPUs are free for the evaluation tasks.
        from orchestrator.pipeline.evaluate_stage import evaluate_family_early

        evaluate_family_early(cfg, out, src.synthetic)
    return out


def _family_stages(cfg: ExperimentConfig, spec: ModelSpec, src: Source, until: Until | None,
                   track: PipelineTracking, slots: contextlib.AbstractContextManager[Any],
                   session: Any) -> ModelOutcome:
    out = ModelOutcome(spec)
    tl, name = timeline.current(), spec.name
    up = upstream(cfg, spec, until, src=src, track=track, slots=slots, session=session)
    out.base_model = up.base_model
    out.base_revision = S.base_revision(up.base)
    if up.scores is None or until == "score":  # `until` stops before the partition
        return out
    tokens, scores, base, valid = up.tokens, up.scores, up.base, up.valid
    with tl.span("partition", name, "data"):
        partition = S.partition_stage(cfg, tokens, scores)
        out.partition_report = S.partition_report(partition)
        track.log_partition(spec, out.partition_report, partition.dir,
                            scores_dir=S.scores_path(scores), tokenizer_dir=out.base_model)
    if until == "partition":
        return out

    # The (method, seed) jobs of this family train in `max_parallel_trainings` Ray Train runs
    # (default 1): each run trains its share one after the other in its worker group, so a
    # worker-group start-up is paid once per run, not once per job. On a cluster, more runs
    # put more worker groups (GPUs) to work at once.
    jobs = [(m, s) for m in cfg.train.methods for s in _seeds(cfg)]
    requests = [S.TrainRequest(tokens if m == "sft" else partition, m, s,
                               track.target(spec, m, s)) for m, s in jobs]
    k = max(1, min(cfg.ray.max_parallel_trainings, len(requests)))
    groups = [list(range(i, len(requests), k)) for i in range(k)]

    def train_group(idx: list[int]) -> list[S.StageOut]:
        with slots:
            return S.train_stages(cfg, spec, base, valid, [requests[i] for i in idx], session)

    done: list[S.StageOut] = [None] * len(requests)  # type: ignore[list-item]
    with tl.span("train", name):
        for idx, outs in zip(groups, _parallel(train_group, groups, k), strict=True):
            for i, stage_out in zip(idx, outs, strict=True):
                done[i] = stage_out
    for job, stage_out in zip(jobs, done, strict=True):
        out.models[job] = S.model_path(stage_out)
        out.train_metrics[job] = S.stage_metrics(stage_out)
        if not stage_out.cached:
            tl.add_training("train", name, out.train_metrics[job])
        track.log_train_metrics(spec, job[0], job[1], out.train_metrics[job])
    return out


def _run_stages(cfg: ExperimentConfig, until: Until | None, track: PipelineTracking) -> dict[str, Any]:
    src = source(cfg)
    slots = TrainingSlots(cfg)
    outcomes = _parallel(lambda spec: _model_chain(cfg, spec, src, until, track, slots),
                         list(cfg.models), cfg.ray.max_parallel_models)
    results: dict[str, Any] = {"outcomes": outcomes}
    if until in (None, "evaluate") and cfg.evaluate.enabled:
        from orchestrator.pipeline.evaluate_stage import evaluate_outcomes

        with timeline.current().span("evaluate", "-"):
            results["eval"] = evaluate_outcomes(cfg, outcomes, src.synthetic, track)
    return results


def run_pipeline(cfg: ExperimentConfig, until: Until | None = None,
                 preflight: bool = False, config_args: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the comparison rows. `preflight`: first
    open everything the run reads (pipeline/access.py, as `lethe plan --check`) and stop
    before Ray starts when a check fails (jobs.pipeline always does). `config_args`: the
    config path and overrides as given (`lethe run` passes them), for the last line's
    `lethe ui` command."""
    from orchestrator.logs import configure_console

    t0 = time.time()
    configure_console()  # progress bars only on a terminal; one line per stage event otherwise
    if preflight:
        from orchestrator.pipeline.access import preflight_or_raise

        preflight_or_raise(cfg)
    tl = timeline.begin(t0)
    root = run_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    # Tracking before any stage: an unreachable MLflow server fails here, not after hours of
    # training. Opened beside Ray's start-up (a new sqlite store runs its schema migrations,
    # about 5 s, while Ray's processes start; each alone leaves a core idle).
    with tl.span("ray-init", "-", "startup"), ThreadPoolExecutor(1) as pool:
        opening = pool.submit(PipelineTracking.open, cfg, root)
        init_ray(cfg)  # on failure the pool still waits for the store, then this raises
        track = opening.result()
    from orchestrator.config import save_config

    save_config(cfg, root / "resolved_config.yaml")
    track.start(cfg, root / "resolved_config.yaml")

    try:
        results = _run_stages(cfg, until, track)
    except BaseException:
        track.fail()
        raise
    end = time.time()
    wall = end - t0
    tl.write(root / "timeline.json", end)
    track.finish(wall, compare=until in (None, "evaluate") and cfg.evaluate.enabled,
                 timeline=tl.summary(end))
    print(tl.text(end))
    if until in (None, "evaluate") and cfg.evaluate.enabled:
        print(track.comparison_text())
    if until in (None, "evaluate"):  # without evaluation: partition, curves, timeline, config
        _write_report(cfg, track)
    print(f"[lethe] pipeline finished in {wall:.1f} s; run directory: {root}")
    print("\n".join(ui_hint(cfg, track.uri, config_args)), flush=True)
    return results


def _write_report(cfg: ExperimentConfig, track: PipelineTracking) -> None:
    """The run's self-contained HTML report (also logged to the parent run). A report that
    cannot be drawn is a warning: the run's results are stored already."""
    from orchestrator.tracking.report import write_report

    try:
        parent = track.parent.run_id if track.parent is not None else None
        path = write_report(cfg, parent_run_id=parent, log_to_mlflow=track.enabled)
        print(f"[lethe] report: {path}")
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        print(f"[lethe] warning: the HTML report could not be written: {type(exc).__name__}: {exc}")


def _config_hint(cfg: ExperimentConfig) -> str:
    return str(run_dir(cfg) / "resolved_config.yaml")


def on_cluster(cfg: ExperimentConfig) -> bool:
    """Whether this run's Ray is a cluster (ray.address names one, or RAY_ADDRESS is set:
    the driver of a `ray job submit` job), so the user reads its output elsewhere."""
    address = (cfg.ray.address or "").strip()
    return (bool(address) and address != "local") or bool(os.environ.get("RAY_ADDRESS", "").strip())


def ui_hint(cfg: ExperimentConfig, uri: str, config_args: list[str] | None) -> list[str]:
    """The end-of-run lines saying how to open the MLflow UI, as a command for the user's
    own machine (tracking/remote_ui.py): `lethe ui` on the config path and overrides the run
    was started with, not the run directory's copy, which exists only where the run ran."""
    from orchestrator.tracking.remote_ui import end_of_run_hint

    lines = end_of_run_hint(uri, config_args, _config_hint(cfg), cfg.tracking.tracking_uri,
                            on_cluster(cfg))
    return [mask_secrets(line) for line in lines]


# ------------------------------------------------------------------ helpers for the CLI


def print_comparison(cfg: ExperimentConfig) -> None:
    track = PipelineTracking.open(cfg, run_dir(cfg))
    print(track.comparison_text())


def serve_ui(cfg: ExperimentConfig, port: int = 5000) -> None:
    import signal

    from orchestrator.tracking.remote_ui import remote_ui_lines
    from orchestrator.tracking.ui import start_ui, stop_ui
    from orchestrator.tracking.uri import is_remote, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking, run_dir(cfg))
    if cfg.tracking.enabled and is_remote(uri):
        # A server serves its own UI: say where, and how to reach it from here.
        print("\n".join(mask_secrets(line) for line in remote_ui_lines(uri, port)), flush=True)
        return
    track = PipelineTracking.open(cfg, run_dir(cfg))

    # The server runs in its own process group; a SIGTERM to this command (a job manager,
    # `timeout`) must stop it too, as Ctrl-C does -- also while it is still starting.
    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    proc = None
    try:
        proc = start_ui(track.uri, host="127.0.0.1", port=port, experiment=track.tracker.experiment)
        print(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C stops it)")
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc is not None:
            stop_ui(proc)
        signal.signal(signal.SIGTERM, previous)


def inspect_sample_cli(cfg: ExperimentConfig, model: str, sample_id: int,
                       html_out: str | None = None) -> str:
    from orchestrator.tracking.inspect import inspect_sample

    spec = next((m for m in cfg.models if m.name == model), None)
    if spec is None:
        names = ", ".join(m.name for m in cfg.models)
        raise SystemExit(f"lethe inspect: no model named '{model}' in the config (models: {names})")
    up = upstream(cfg, spec, "data")
    found = S.find_done(cfg, "partition", {"tokens": up.tokens.key,
                                           "partition": cfg.partition.model_dump(mode="json")})
    if found is None:
        raise SystemExit("lethe inspect: no finished partition for this config; run `lethe run` first")
    scores = S.StageOut(found.inputs["scores"], S.stages_root(cfg) / "scores" / found.inputs["scores"],
                        True)
    scores_dir = S.scores_path(scores)
    text, html = inspect_sample(found.dir / "partitioned.parquet", scores_dir, up.base_model,
                                sample_id)
    if html_out:
        Path(html_out).write_text(html)
    return text
