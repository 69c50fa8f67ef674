"""The evaluation, sweep, tracking and Ray sections of the experiment config.

Split from config.py to keep files small; import them from orchestrator.config. Every
field carries its docstring (it becomes the field's description), as in
orchestrator/config_sections.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.config_models import DType, Strict
from orchestrator.names import NegativeTerm, Schedule


def _check_limit(value: int | float | None, where: str) -> int | float | None:
    """lm-eval's limit: an integer >= 1 is a number of examples per task, a float in (0, 1)
    a fraction of each task (the paper's script passes `--limit 0.99`)."""
    if value is None or isinstance(value, bool):
        return None if value is None else _bad_limit(value, where)
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    if isinstance(value, int) and value >= 1 or isinstance(value, float) and 0.0 < value < 1.0:
        return value
    return _bad_limit(value, where)


def _bad_limit(value: Any, where: str) -> Any:
    raise ValueError(f"{where}: {value!r} is neither a count >= 1 nor a fraction in (0, 1)")


class BenchmarkSpec(Strict):
    """One headline benchmark: the mean of `metric` over `tasks` (several tasks when a
    benchmark is split per language, as TydiQA's gold-passage tasks are)."""

    tasks: list[str] = Field(min_length=1)
    """lm-eval tasks averaged into this benchmark (each must be in evaluate.tasks)."""
    metric: str
    """The metric name as Lethe logs it (lm-eval's key without ",<filter>")."""

    @field_validator("metric")
    @classmethod
    def _no_filter_suffix(cls, value: str) -> str:
        if "," in value:  # lm-eval's raw key: never matches a logged metric
            raise ValueError(f"metric {value!r}: name the metric as Lethe logs it, without "
                             f"lm-eval's ',<filter>' suffix ({value.split(',')[0]!r}; a task "
                             "scored under several filters logs '<metric>_<filter>')")
        return value


class EvaluateConfig(Strict):
    """lm-eval on every trained model and the base models (orchestrator/evaluation)."""

    enabled: bool = True
    """Evaluate at all (false: the pipeline ends after training)."""
    tasks: list[str] = ["lethe_synth_mc", "lethe_synth_gen"]
    """Task names; the embedded default's local tasks are generated from the synthetic
    corpus's held-out split and found through include_path."""
    include_path: str | None = None
    """A folder of lm-eval task YAMLs; None = the generated local task folder."""
    num_fewshot: dict[str, int] = {}
    """Shots per task; a task not named uses its own default."""
    batch_size: int = Field(default=16, ge=1)
    """lm-eval's batch size."""
    limit: int | float | None = None
    """Per task: a count >= 1 or a fraction in (0, 1); None = every example."""
    task_limit: dict[str, int | float] = {}
    """Per-task override of `limit`."""
    seed: int | None = None
    """lm-eval's four seeds (python, numpy, torch, few-shot sampling); None = its defaults."""
    benchmarks: dict[str, BenchmarkSpec] = {}
    """The headline: {name: {tasks, metric}} in display order; `lethe compare` shows each and
    their average per method (the paper reports the average over five benchmarks)."""
    num_gpus: float = Field(default=0.0, ge=0.0)
    """GPUs per evaluation task."""
    num_cpus: float = Field(default=1.0, gt=0.0)
    """CPUs per evaluation task."""
    max_workers: int = Field(default=4, ge=1)
    """Evaluation workers (Ray actors, num_cpus / num_gpus each) at once: models go to
    whichever is free; workers without room yet wait in Ray's queue. Families evaluated
    early share it (ray.max_parallel_models)."""
    dtype: DType = "auto"
    """Model dtype; auto = bfloat16 on a GPU that supports it, float32 on CPU."""
    evaluate_base: bool = True
    """Also evaluate each untrained base model (the floor of the comparison)."""

    @model_validator(mode="after")
    def _known_tasks(self) -> EvaluateConfig:
        self.__dict__["limit"] = _check_limit(self.limit, "evaluate.limit")
        for task, value in self.task_limit.items():
            self.task_limit[task] = _check_limit(value, f"evaluate.task_limit.{task}")
        known = set(self.tasks)
        named = [("num_fewshot", t) for t in self.num_fewshot] + [
            ("task_limit", t) for t in self.task_limit] + [
            (f"benchmarks.{b}.tasks", t) for b, spec in self.benchmarks.items() for t in spec.tasks]
        for where, task in named:
            if task not in known:
                raise ValueError(f"evaluate.{where}: task '{task}' is not in evaluate.tasks "
                                 f"({', '.join(self.tasks)})")
        return self


class TuneConfig(Strict):
    """`lethe tune`: a Ray Tune sweep over lambda's maximum and rho (orchestrator/tune)."""

    num_samples: int = Field(default=6, ge=1)
    """Trials."""
    lambda_max: tuple[float, float] = (0.01, 1.0)
    """Log-uniform range of the ramp's maximum (train.lambda.t_max)."""
    rho: tuple[float, float] = (0.5, 0.9)
    """Uniform range of partition.rho."""
    negative_terms: list[NegativeTerm] | None = None
    """Also choose the negative term among these; None = train.negative_term."""
    schedules: list[Schedule] | None = None
    """Also choose the lambda schedule among these; None = train.lambda.schedule."""
    metric: str = "val_loss"
    """The metric trials are ranked by (a training report or `eval/<task>/<metric>`)."""
    mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher `metric` is better."""
    search_alg: Literal["random", "optuna"] = "random"
    """random: Tune's seeded random search; optuna: TPE (optuna is installed with Lethe)."""
    grace_period: int = Field(default=1, ge=1)
    """ASHA: reports before a trial may be stopped."""
    reduction_factor: float = Field(default=2.0, gt=1.0)
    """ASHA: the share of trials kept at each rung is 1 / reduction_factor."""
    max_concurrent_trials: int = Field(default=1, ge=1)
    """Trials at once (the sweep's cap; a trial that does not fit yet waits in Ray's queue,
    where a cluster's autoscaler sees it). Raise it on a cluster with room for several
    trials' worker groups."""
    gpus_per_trial: float = Field(default=0.0, ge=0.0)
    """GPUs reserved by a trial's driver function."""
    cpus_per_trial: float = Field(default=0.01, gt=0.0)
    """CPUs reserved by a trial's driver function (its training reserves its own)."""


class TrackingConfig(Strict):
    """MLflow tracking (orchestrator/tracking)."""

    enabled: bool = True
    """Track at all (false: every logging call is a no-op)."""
    tracking_uri: str | None = None
    """None = sqlite file in the run directory, unless MLFLOW_TRACKING_URI is set."""
    experiment: str | None = None
    """The MLflow experiment; None = the config's name."""


class RayConfig(Strict):
    """The Ray instance and how much of the pipeline runs side by side."""

    address: str | None = None
    """None = start a local instance (inside `ray job submit`: join the job's cluster)."""
    num_cpus: int | None = None
    """For a local instance (logical slots, may exceed cores)."""
    max_parallel_models: int = Field(default=1, ge=1)
    """Model families whose chains (reference -> score -> partition -> train -> eval) run at
    the same time. On a cluster the chains share the GPUs through Ray's scheduler; on a
    laptop running them side by side hides Ray Train's per-run start-up latency."""
    max_parallel_trainings: int = Field(default=1, ge=1)
    """Ray Train runs in flight per model family. Each run trains its share of the family's
    methods x seeds one after the other in one worker group (one start-up per run): 1 on a
    small machine; on a cluster, as many as there are worker groups' worth of GPUs."""
    max_training_runs: int | None = Field(default=None, ge=1)
    """Ray Train runs in flight at once over all families (each holds its workers'
    resources while it lives; more wait for a slot, and a run that does not fit the cluster
    yet waits in Ray's queue). None = max_parallel_models x max_parallel_trainings (the
    resolved number is what `lethe validate` prints)."""
    prestart_training: bool = False
    """Start a family's training run (its CPU training session, pipeline/sessions.py) while
    the base model is still being built, so Ray Train's start-up overlaps the build. Off by
    default: on the 2-core machine the start-ups then compete with the base builds for the
    same cores (1-seed default: 314 s with it, 288 s without, one run each); on with cores
    to spare."""
    dashboard: bool = False
    """Start Ray's dashboard with a local instance (on 127.0.0.1:8265). Off by default: it
    costs about 3 s at start and a share of a core while it runs, which a 2-core laptop
    feels; on to watch a long local run. A cluster (`address`) has its own."""

    @model_validator(mode="after")
    def _training_runs(self) -> RayConfig:
        if self.max_training_runs is None:  # resolved here, so `lethe validate` shows it
            self.__dict__["max_training_runs"] = self.max_parallel_models * self.max_parallel_trainings
        return self
