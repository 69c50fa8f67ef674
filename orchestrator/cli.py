"""The `lethe` command line.

    lethe run CONFIG [key.path=value ...] [--until STAGE]   the pipeline (cached stages)
        [--preflight]                                       ... after the access checks pass (jobs.pipeline)
    lethe tune CONFIG [overrides]                           a Ray Tune sweep over lambda / rho
    lethe compare CONFIG                                    methods table, paired effects, noise detection
    lethe report CONFIG [--out PATH]                        the run as one self-contained HTML page
    lethe ui CONFIG [--port 5000]                           MLflow UI on 127.0.0.1 (a server's: URL + tunnel)
    lethe inspect CONFIG --model NAME --sample ID           a sample's tokens by score / class
    lethe validate CONFIG [overrides]                       print the resolved config (+ data row layouts)
    lethe sync CONFIG                                       send metrics spooled in an MLflow outage
    lethe plan CONFIG [overrides] [--address A]             dry run: stages, cache, steps, resources
    lethe plan CONFIG --check                               open the data, eval tasks, models, MLflow
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from orchestrator.config import ConfigError, ExperimentConfig, load_config
from orchestrator.masking import mask_secrets
from orchestrator.names import UNTIL

STAGES = UNTIL  # where `lethe run --until` may stop (orchestrator.names.Until)
DEBUG_HELP = "show the full traceback of an error (default: one line on stderr)"


def _runs_embedded(args: argparse.Namespace) -> bool:
    """Whether this command runs on the embedded local Ray instance (offline defaults) rather
    than as, or for, a cluster job (orchestrator/embedded.py). Decided from RAY_ADDRESS, the
    config's ray.address and `--address`, before anything imports the hub libraries. A
    preflight (`--check`) asks the hub, so it is never offline by default."""
    from orchestrator.embedded import joins_cluster

    if getattr(args, "check", False):
        return False
    try:
        address = getattr(args, "address", None) or _load(args).ray.address
    except Exception:  # the command itself reports a bad config, with its own message
        address = None
    return not joins_cluster(address)


def _load(args: argparse.Namespace) -> ExperimentConfig:
    # Loaded once per command: _runs_embedded reads it before the command runs.
    if getattr(args, "loaded_config", None) is None:
        args.loaded_config = load_config(args.config, list(getattr(args, "overrides", []) or []))
    return args.loaded_config


def _cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.pipeline.run import run_pipeline

    run_pipeline(_load(args), until=args.until, preflight=args.preflight,
                 config_args=[args.config, *args.overrides])
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from orchestrator.tune.sweep import run_sweep

    run_sweep(_load(args))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from orchestrator.pipeline.run import print_comparison

    print_comparison(_load(args))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.tracking.report import write_report

    print(write_report(_load(args), args.out))
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from orchestrator.pipeline.run import serve_ui

    serve_ui(_load(args), port=args.port)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from orchestrator.pipeline.run import inspect_sample_cli

    print(inspect_sample_cli(_load(args), model=args.model, sample_id=args.sample, html_out=args.html))
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    from orchestrator.tracking.resilient import pending_files, sync_pending
    from orchestrator.tracking.uri import resolve_tracking_uri

    cfg = _load(args)
    root = Path(cfg.run_dir).resolve() / cfg.name
    files = pending_files(root)
    if not files:
        print(f"[lethe] sync: nothing pending under {root}")
        return 0
    uri = resolve_tracking_uri(cfg.tracking, root)
    counts = sync_pending(root, uri)
    print(f"[lethe] sync: {counts['metric_values']} metric values in {counts['operations']} "
          f"operations from {counts['files']} of {len(files)} file(s) sent to "
          f"{mask_secrets(uri)}")
    return 1 if counts["failed_files"] else 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from orchestrator.data.row_formats import describe_first_rows
    from orchestrator.evaluation.runner import describe_plan

    cfg = _load(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if cfg.evaluate.enabled:  # as YAML comments: the output stays a loadable config
        print("\n".join(f"# evaluate: {line}" for line in describe_plan(cfg.evaluate)))
    rows = describe_first_rows(cfg.data)  # a local data file: the layout of its first rows
    if rows:
        print("\n".join(f"# data (format {cfg.data.format}): {line}" for line in rows))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    if args.check:  # the access checks only (pipeline/access.py): no Ray, no plan
        from orchestrator.pipeline.access import run_check_command

        return run_check_command(_load(args))
    from orchestrator.pipeline.plan import run_plan

    return run_plan(_load(args), address=args.address)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lethe", description="Token-level forgetting fine-tuning on Ray")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="experiment YAML (e.g. configs/demo.yaml)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
        # SUPPRESS: an absent subcommand flag must not reset `lethe --debug run ...`
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        return sp

    run = with_config("run", "run the pipeline")
    run.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    run.add_argument("--preflight", action="store_true", help="first run the checks of "
                     "`lethe plan --check`; stop before any stage when one fails")
    run.set_defaults(fn=_cmd_run)
    with_config("tune", "Ray Tune sweep over lambda and rho").set_defaults(fn=_cmd_tune)
    with_config("compare", "family x method x task table, paired effects over seeds "
                "(Student-t CI), noise detection per kind").set_defaults(fn=_cmd_compare)
    rep = with_config("report", "write the latest run's self-contained HTML report")
    rep.add_argument("--out", default=None, help="where to write it (default runs/<name>/report.html)")
    rep.set_defaults(fn=_cmd_report)
    ui = with_config("ui", "start the MLflow UI on 127.0.0.1; for a tracking server, print its "
                     "URL and the port-forward / SSH tunnel that reaches it from here")
    ui.add_argument("--port", type=int, default=5000,
                    help="local port: of the UI started here, or of the tunnel to a server")
    ui.set_defaults(fn=_cmd_ui)
    ins = with_config("inspect", "show a sample's tokens coloured by score and class")
    ins.add_argument("--model", required=True, help="model name from the config")
    ins.add_argument("--sample", type=int, required=True, help="sample_id")
    ins.add_argument("--html", default=None, help="also write the HTML page here")
    ins.set_defaults(fn=_cmd_inspect)
    with_config("validate", "print the resolved config and the format of a local data "
                "file's first rows").set_defaults(fn=_cmd_validate)
    with_config("sync", "send metrics MLflow did not take during an outage "
                "(runs/<name>/**/mlflow_pending)").set_defaults(fn=_cmd_sync)
    plan = with_config("plan", "dry run: stages, hashes, cache, samples, steps, resources")
    plan.add_argument("--address", default=None, help="Ray cluster to check against "
                      "(default: ray.address, else a local instance)")
    plan.add_argument("--check", action="store_true", help="instead of the plan: open the "
                      "training data, every evaluation task's dataset, each model's config "
                      "and tokenizer and the MLflow server, one line each; exit 1 on a failure")
    plan.set_defaults(fn=_cmd_plan)
    return p


def _known_error(exc: BaseException) -> BaseException | None:
    """The Lethe error (or OS error) behind `exc`, or None for anything else (a bug keeps
    its traceback). Ray re-raises a task's error as a subclass that also carries `cause`."""
    from orchestrator.data.errors import DataError
    from orchestrator.errors import LetheError
    from orchestrator.tracking.uri import TrackingError

    known = (ConfigError, DataError, TrackingError, LetheError, OSError)
    cause = getattr(exc, "cause", None)
    if isinstance(cause, known):
        return cause
    return exc if isinstance(exc, known) else None


def error_line(exc: BaseException) -> str:
    """One line for stderr (a config error keeps its per-key lines)."""
    if isinstance(exc, OSError) and not isinstance(exc, ConfigError):
        what = exc.strerror or str(exc)
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{what}{where}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            text += ("; free space there (or point run_dir elsewhere) and run again: finished "
                     "stages are kept, half-written files are removed")
    else:
        text = str(exc)
    text = mask_secrets(text)
    if isinstance(exc, ConfigError):
        return text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if len(lines) <= 1 else f"{lines[0]} (+{len(lines) - 1} more lines; --debug)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator.embedded import environment_defaults

    environment_defaults(embedded=_runs_embedded(args))
    debug = bool(getattr(args, "debug", False)) or os.environ.get("LETHE_DEBUG") == "1"
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        if debug:
            raise
        print("lethe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        known = _known_error(exc)
        if known is None or debug:
            raise
        print(f"lethe: {error_line(known)}", file=sys.stderr)
        return 2 if isinstance(known, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
