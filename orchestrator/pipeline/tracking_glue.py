"""How the pipeline maps onto MLflow runs.

    experiment (one per config name)
      parent run "pipeline-<time>"        flattened config as params, resolved config, compare table
        child "<model>/<method>/s<seed>"  tags family/model/method/seed/rho/lambda...; training
                                          curves (logged by rank 0 into this run), eval metrics
        child "<model>/base"              the untrained base model's eval metrics (the floor)
        child "<model>/partition"         partition stats, histogram, token inspector pages

Children are created once per pipeline run, even when their stages are cached, so the
comparison of the latest parent run always has every row.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.config import ExperimentConfig, ModelSpec
from orchestrator.tracking import RunLabel, Tracker
from orchestrator.tracking.resilient import SPOOL_DIRNAME
from orchestrator.tracking.target import NO_SEED

INSPECT_SAMPLES = 3  # inspector pages logged per model (noisy samples first)
_STAGE_RUNS = ("partition", "reference")  # per-model stage runs, kept out of `compare`


class PipelineTracking:
    def __init__(self, tracker: Any, cfg: ExperimentConfig, root: Path) -> None:
        self.tracker = tracker
        self.cfg = cfg
        self.root = root
        self.parent: Any = None
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        self._down, self._probe_valid_until = False, 0.0  # see mlflow_down

    @classmethod
    def open(cls, cfg: ExperimentConfig, root: Path, check: bool = True) -> PipelineTracking:
        """Resolve the store; with `check`, an unreachable server raises TrackingError now."""
        return cls(Tracker.open(cfg, root, check=check), cfg, root)

    @property
    def uri(self) -> str:
        return self.tracker.uri or "(tracking disabled)"

    @property
    def enabled(self) -> bool:
        return bool(self.tracker.enabled)

    def start(self, cfg: ExperimentConfig, config_path: Path | None, run_name: str | None = None) -> None:
        name = run_name or f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}"
        self.parent = self.tracker.start_parent(name, cfg)
        if config_path is not None:  # as masked text, like every artifact (no-op: disabled)
            self.parent.log_text(Path(config_path).read_text(), Path(config_path).name)

    def attach_parent(self, run_id: str | None) -> None:
        """Nest this process's child runs under a parent created elsewhere (a Tune trial
        under its sweep's run)."""
        if not self.enabled or run_id is None:
            return
        from orchestrator.tracking import RunLogger, TrackingTarget

        self.parent = RunLogger(self.tracker.client, TrackingTarget(
            self.tracker.uri, self.tracker.experiment, run_id))
        self.tracker.parent = self.parent

    # ------------------------------------------------------------------ child runs

    def _tags(self, spec: ModelSpec, method: str, seed: Any) -> dict[str, Any]:
        tags: dict[str, Any] = {"family": spec.family, "model": spec.name, "method": method,
                                "seed": seed}
        if method in ("ignore", "forget"):
            tags["rho"] = self.cfg.partition.rho
        if method == "forget":
            lam = self.cfg.train.lambda_
            tags.update(lambda_max=lam.t_max, lambda_schedule=lam.schedule,
                        negative_term=self.cfg.train.negative_term)
        return tags

    def child(self, spec: ModelSpec, method: str, seed: Any,
              extra_tags: dict[str, Any] | None = None) -> Any:
        key = (spec.name, method, str(seed), *sorted(f"{k}={v}" for k, v in (extra_tags or {}).items()))
        with self._lock:
            if key not in self._children:
                seedless = method in ("base", *_STAGE_RUNS)
                name = RunLabel(spec.name, method, NO_SEED if seedless else seed).run_name
                if extra_tags and "trial_id" in extra_tags:
                    name = f"{name}/{extra_tags['trial_id']}"
                tags = self._tags(spec, method, seed)
                if method in _STAGE_RUNS:  # not a compared method: no `method` tag
                    tags.pop("method")
                    tags["lethe.stage"] = method
                self._children[key] = self.tracker.start_child(name, {**tags, **(extra_tags or {})})
            return self._children[key]

    def target(self, spec: ModelSpec, method: str, seed: Any,
               extra_tags: dict[str, Any] | None = None) -> Any:
        """Where a training run's rank 0 logs its curves (None when tracking is off: a
        NullRun has no target, and the worker then logs into a NullRun too)."""
        run = self.child(spec, method, seed, extra_tags)
        if run.target is None:
            return None
        return replace(run.target, parent_run_id=self.parent.run_id if self.parent else None,
                       tags=dict(run.target.tags), spool_dir=str(self.root / SPOOL_DIRNAME))

    # ------------------------------------------------------------------ stage results

    def mlflow_down(self, what: str) -> bool:
        """True (with a warning) when MLflow does not answer one quick probe; the answer is
        kept for 30 s. Driver-side logging after finished work is then skipped instead of
        failing a run whose results are on disk: with the server back, a rerun of the same
        config logs them (every stage is cached). Rank 0's curves are spooled for `lethe sync`."""
        from orchestrator.tracking.resilient import reachable

        now = time.monotonic()
        if now >= self._probe_valid_until:
            self._down = not reachable(self.tracker.uri)
            self._probe_valid_until = now + 30.0
        if self._down:
            print(f"[lethe] WARNING: MLflow is unreachable; {what} not logged (results are in "
                  f"the stage folders; rerun this config once the server is back)", flush=True)
        return self._down

    def log_partition(self, spec: ModelSpec, report: dict[str, Any], stage_dir: Path,
                      scores_dir: Path | None = None, tokenizer_dir: str | None = None) -> None:
        if not self.enabled or self.mlflow_down(f"{spec.name} partition stats"):
            return
        run = self.child(spec, "partition", NO_SEED)
        run.log_partition_stats(report, histogram=stage_dir / "histogram.png")
        by_kind = report.get("noise_by_kind") or {}  # recall / AUROC per noise kind
        run.log_metrics({f"partition/noise_kind/{kind}/{k}": v
                         for kind, stats in by_kind.items() for k, v in stats.items()})
        if (stage_dir / "report.json").is_file():
            run.log_artifact(stage_dir / "report.json", "partition")
        if scores_dir is not None and tokenizer_dir is not None:
            self._log_inspector_pages(run, stage_dir / "partitioned.parquet", scores_dir, tokenizer_dir)

    def _log_inspector_pages(self, run: Any, partitioned: Path, scores_dir: Path, tok: str) -> None:
        import pyarrow.parquet as pq

        from orchestrator.tracking.inspect import inspect_sample

        cols = ["sample_id"] + (["noise_mask"] if "noise_mask" in pq.read_schema(partitioned).names else [])
        table = pq.read_table(partitioned, columns=cols).to_pydict()
        ids = table["sample_id"]
        if "noise_mask" in table:  # noisy samples first: they show what forgetting targets
            ids = sorted(ids, key=lambda i: -sum(table["noise_mask"][ids.index(i)]))
        for sid in ids[:INSPECT_SAMPLES]:
            _, html = inspect_sample(partitioned, scores_dir, tok, int(sid))
            run.log_text(html, f"inspect/sample_{sid}.html")

    def log_eval(self, results: dict[str, dict[str, Any]], dirs: dict[str, Path],
                 extra_tags: dict[str, Any] | None = None) -> None:
        if self.mlflow_down("evaluation metrics"):
            return
        specs = {m.name: m for m in self.cfg.models}
        for text, metrics in results.items():
            label = RunLabel.parse(text)
            run = self.child(specs[label.model], label.method, label.seed, extra_tags)
            run.log_eval_metrics(metrics)
            if self.cfg.evaluate.benchmarks:  # the paper's headline per run, beside its tasks
                from orchestrator.evaluation.benchmarks import benchmark_scores, flatten_metrics

                head = benchmark_scores(flatten_metrics(metrics), self.cfg.evaluate.benchmarks)
                run.log_metrics({f"headline/{k}": v for k, v in head.items()})
            if (dirs[text] / "eval_results.json").is_file():
                run.log_artifact(dirs[text] / "eval_results.json", "eval")

    def log_train_metrics(self, spec: ModelSpec, method: str, seed: Any,
                          metrics: dict[str, Any]) -> None:
        if not self.mlflow_down(f"{spec.name}/{method} final metrics"):
            self.child(spec, method, seed).log_metrics({f"final/{k}": v for k, v in metrics.items()})

    def finish_children(self) -> None:
        for run in self._children.values():
            run.end("FINISHED")

    def finish(self, wall_s: float, compare: bool = True,
               timeline: dict[str, Any] | None = None) -> None:
        if not self.enabled or self.parent is None or self.mlflow_down("the run's end"):
            return
        self.parent.log_metrics({"pipeline_wall_s": wall_s})
        if timeline is not None:  # where the wall time went (orchestrator/pipeline/timeline.py)
            self.parent.log_metrics({"timeline/compute_s": timeline["compute_seconds"],
                                     "timeline/overhead_fraction": timeline["overhead_fraction"]})
            self.parent.log_dict(timeline, "timeline.json")
        self.finish_children()
        if compare:
            from orchestrator.tracking.compare import CompareOrder, cli_compare

            cli_compare(self.tracker.uri, self.tracker.experiment, self.root / "compare",
                        parent_run_id=self.parent.run_id, print_table=False,
                        order=CompareOrder.from_config(self.cfg))
        self.tracker.end_parent("FINISHED")

    def fail(self) -> None:
        if self.enabled and self.parent is not None:
            from orchestrator.tracking.resilient import reachable, spool_operations

            runs = [*self._children.values(), self.parent]
            # The run is failing, maybe because MLflow is down: one 2-second probe instead of
            # waiting through MLflow's retries once per run; the FAILED marks wait in the
            # spool for `lethe sync`.
            if not reachable(self.tracker.uri):
                end = int(time.time() * 1000)
                path = spool_operations(self.root / SPOOL_DIRNAME, "pipeline-failed",
                                        self.tracker.uri,
                                        [{"op": "status", "run_id": r.run_id, "status": "FAILED",
                                          "end_time": end} for r in runs])
                print(f"[lethe] WARNING: MLflow is unreachable; the runs' FAILED status is kept "
                      f"in {path} for `lethe sync`", flush=True)
                return
            for run in self._children.values():
                run.end("FAILED")
            self.tracker.end_parent("FAILED")

    def comparison_text(self) -> str:
        if not self.enabled:
            return "(tracking disabled: no comparison table)"
        if self.mlflow_down("the comparison table"):
            return "(MLflow unreachable: no comparison table; `lethe compare` once it is back)"
        from orchestrator.tracking.compare import CompareOrder, comparison_report

        parent = self.parent.run_id if self.parent is not None else None
        return comparison_report(self.tracker.uri, self.tracker.experiment, parent_run_id=parent,
                                 order=CompareOrder.from_config(self.cfg))

    def log_sweep(self, rows: list[dict[str, Any]], metric: str, best_path: Path, table: str) -> None:
        """The sweep's table, best config and a metric-vs-(lambda, rho) plot on the parent."""
        if not self.enabled or self.parent is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.parent.log_text(table, "sweep/trials.txt")
        self.parent.log_artifact(best_path, "sweep")
        ok = [r for r in rows if r.get(metric) is not None]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        if ok:
            lam = [r["lambda_max"] for r in ok]
            rho = [r["rho"] for r in ok]
            val = [r[metric] for r in ok]
            axes[0].scatter(lam, val)
            axes[0].set_xscale("log")
            axes[0].set_xlabel("lambda_max")
            axes[0].set_ylabel(metric)
            axes[1].scatter(rho, val)
            axes[1].set_xlabel("rho")
            axes[1].set_ylabel(metric)
            # the (lambda, rho) heat map: colour = the metric, marker = the negative term
            norm = plt.Normalize(min(val), max(val))
            for term, marker in zip(sorted({str(r.get("negative_term")) for r in ok}), "osD^v",
                                    strict=False):
                sel = [i for i, r in enumerate(ok) if str(r.get("negative_term")) == term]
                sc = axes[2].scatter([lam[i] for i in sel], [rho[i] for i in sel],
                                     c=[val[i] for i in sel], cmap="viridis", norm=norm,
                                     marker=marker, s=60, edgecolors="k", label=term)
                for i in sel:
                    axes[2].annotate(f"{val[i]:.3g}", (lam[i], rho[i]), fontsize=7,
                                     xytext=(4, 4), textcoords="offset points")
            axes[2].legend(fontsize=7, title="negative term", title_fontsize=7)
            axes[2].set_xscale("log")
            axes[2].set_xlabel("lambda_max")
            axes[2].set_ylabel("rho")
            fig.colorbar(sc, ax=axes[2], label=metric)
        fig.suptitle(f"sweep {self.cfg.name}: {metric} by trial")
        fig.tight_layout()
        self.parent.log_figure(fig, "sweep/metric_vs_lambda_rho.png")
        pick = max if self.cfg.tune.mode == "max" else min
        self.parent.log_metrics({f"best/{metric}": pick(r[metric] for r in ok) if ok else None})
        self.finish(0.0, compare=False)
