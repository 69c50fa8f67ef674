"""The rehearsal (issue 22, item 9): the paper's experiment exactly as a user launches it on a
cluster, shrunk to this machine.

    python -m jobs.submit --address <job API> --runtime-env cluster/runtime_env.yaml \\
        --working-dir . -- python -m jobs.pipeline --config configs/paper/llama3.2-1b.yaml

runs on the two-node local cluster the suite already starts (tests/two_node_cluster.py).
configs/paper/llama3.2-1b.yaml and cluster/runtime_env.yaml are the shipped files (the job
reads the config from its working dir, jobs.submit reads the runtime env from cluster/);
every change is a dotted override on the job's command line or a submission argument, all
listed in `OVERRIDES` / `SUBMISSION` below, each with why, and nothing else is changed. The
overrides change sizes and locations only: a tiny Llama materialised here, 64 rows in the
released sample's own format and columns (a file named as in the hub repository, in a
folder shaped like it), 1 seed, the CPU in place of GPUs, the run directory, the paper's 13
lm-eval tasks on local rows (tests/paper_eval_rows.py: Lethe's LogiQA override and lm-eval's
own task YAMLs with only their data swapped) and a local MLflow server with authentication
(tests/mlflow_auth_server.py), whose credentials travel as the shipped files say: exported
in the submitting shell, forwarded by jobs.submit.

Asserted: the job succeeds through the preflight and every stage (base, tokens, reference,
scores, partition, three trainings, four evaluations); the MLflow parent run carries the
five-benchmark table (truthfulqa, boolq, logiqa, tydiqa, asdiv and their average) for base,
sft, ignore and forget, each child run the metrics of all 13 tasks; every variable the
shipped runtime env sets reaches the job's driver and actors on both nodes unchanged
(jobs.cluster_probe, run first in the same job), the credentials by name only.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
import two_node_cluster
import yaml
from mlflow_auth_server import mlflow_auth_server
from paper_eval_rows import PAPER_TASKS, write_paper_tasks
from two_node_cluster import ROOT, cluster_env, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The session's one two-node cluster (shared with the other two-node modules).
two_nodes = two_node_cluster.two_nodes

CONFIG = "configs/paper/llama3.2-1b.yaml"  # relative: the job reads its working dir's copy
RUNTIME_ENV = ROOT / "cluster/runtime_env.yaml"
SAMPLE_FILE = "tulu_50k_sample.json"  # the file's name in Aligh1380/forgetting-llm-dataset
FAMILY = "llama3.2-1b"  # the config's model name: the comparison's row key
METHODS = ("base", "sft", "ignore", "forget")
BENCHMARKS = ("truthfulqa", "boolq", "logiqa", "tydiqa", "asdiv")
N_ROWS = 64  # 2 optimizer steps per training (2 workers x 4 x 4 = 32 rows a step)


def overrides(data_file: Path, base: Path, tasks: Path, run_dir: Path,
              mlflow_uri: str) -> dict[str, Any]:
    """Every change to configs/paper/llama3.2-1b.yaml: sizes and locations only."""
    return {
        # location: a writable folder of this test instead of /mnt/shared/lethe-runs
        "run_dir": str(run_dir),
        # size: 1 seed instead of the comparison's 3 (3 trainings, not 9)
        "seeds": [42],
        # location: the released sample as a local file (the config's own "Offline:" recipe):
        # the hub repository's file name, messages rows with the Tulu columns (dataset, id,
        # messages); a file is read by data.source 'file', which takes no data_files
        "data.source": "file",
        "data.path": str(data_file),
        "data.data_files": None,
        # size + location: a tiny Llama (1 layer, hidden 32, BPE of 320 tokens trained on the
        # sample) saved here as a Hugging Face folder, in place of meta-llama/Llama-3.2-1B
        "models.0.pretrained": str(base),
        # size: the reference trains on 32 of the 64 rows (the paper: 10k of 50k)
        "reference.subset_size": 32,
        # size + device: 2 CPU scoring actors (one per node) instead of 8 GPU ones
        "scoring.num_actors": 2,
        "scoring.num_gpus_per_actor": 0,
        "scoring.num_cpus_per_actor": 0.5,
        # size + device: 2 CPU Ray Train workers (a node has 2 CPUs) instead of 8 GPUs
        "train.num_workers": 2,
        "train.use_gpu": False,
        "train.gpus_per_worker": 0,
        "train.cpus_per_worker": 0.5,
        # device: the evaluation on a CPU (the node's 2 CPUs hold one at a time beside the rest)
        "evaluate.num_gpus": 0,
        "evaluate.num_cpus": 1,
        # size: 4 samples per task instead of 99 % of each (TydiQA: its 2 local rows a language)
        "evaluate.limit": 4,
        # location: where lm-eval finds the 13 tasks' local rows (the tasks' own definitions,
        # LogiQA through Lethe's override, only their data files swapped)
        "evaluate.include_path": str(tasks),
        # location: the local MLflow server (the config's documented way to name a server;
        # on a cluster the nodes' MLFLOW_TRACKING_URI says it)
        "tracking.tracking_uri": mlflow_uri,
    }


# Changes to how the job is submitted (besides the config): the place, the credentials.
SUBMISSION = {
    "--address": "the two-node cluster's job API (location)",
    "MLFLOW_TRACKING_USERNAME / _PASSWORD in the submitting shell":
        "the local server's admin user; jobs.submit forwards them, as on a cluster",
    "entrypoint prefix `python -m jobs.cluster_probe &&`":
        "reads the runtime env's variables in the job's driver and actors on both nodes",
}


def _cli(items: dict[str, Any]) -> list[str]:
    """Dotted overrides for the job's command line (values in YAML: null, [42], false)."""
    return [f"{k}={json.dumps(v)}" if v is None or isinstance(v, (list, bool)) else f"{k}={v}"
            for k, v in items.items()]


def _sample_rows(n: int) -> list[dict[str, Any]]:
    """Rows in the released sample's format: Tulu v2's columns, a two-turn conversation."""
    return [{"dataset": "flan_v2", "id": f"flan_v2_{i}",
             "messages": [{"role": "user", "content": f"What is {i} plus {i + 3}?"},
                          {"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}."}]}
            for i in range(n)]


def _tiny_base(out: Path, rows: list[dict[str, Any]]) -> Path:
    from orchestrator.config import ModelSpec
    from orchestrator.models import materialize_base

    spec = ModelSpec(name="tiny", family="llama", tokenizer_vocab_size=320,
                     from_config={"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                  "num_kv_heads": 1, "intermediate_size": 64,
                                  "max_position_embeddings": 2048})  # data.max_seq_len as shipped
    texts = [m["content"] for r in rows for m in r["messages"]]
    return Path(materialize_base(spec, texts, out))


def _headline_table(client: Any, parent_id: str) -> dict[str, dict[str, float]]:
    metrics = client.get_run(parent_id).data.metrics
    return {m: {b: metrics.get(f"compare/{FAMILY}/{m}/{b}/mean")
                for b in (*BENCHMARKS, "average")} for m in METHODS}


def test_paper_config_and_runtime_env_as_shipped_on_two_nodes(two_nodes, tmp_path, monkeypatch):
    start = time.time()
    rows = _sample_rows(N_ROWS)
    hub = tmp_path / "hub" / "forgetting-llm-dataset"  # the repository's layout: the file at its root
    hub.mkdir(parents=True)
    (hub / SAMPLE_FILE).write_text(json.dumps(rows))  # one JSON document, as released
    base = _tiny_base(tmp_path / "base", rows)
    tasks = write_paper_tasks(tmp_path / "tasks")
    run_dir = tmp_path / "runs"
    shipped_env = yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]

    with mlflow_auth_server(tmp_path / "mlflow") as server:
        items = overrides(hub / SAMPLE_FILE, base, tasks, run_dir, server.uri)
        print("\n[rehearsal] config overrides (configs/paper/llama3.2-1b.yaml as shipped + these):")
        for line in _cli(items):
            print(f"  {line}")
        print("[rehearsal] submission:")
        for k, why in SUBMISSION.items():
            print(f"  {k}: {why}")
        creds = {k: v for k, v in server.env().items() if k != "MLFLOW_TRACKING_URI"}
        entry = ["python", "-m", "jobs.cluster_probe", "&&",
                 "python", "-m", "jobs.pipeline", "--config", CONFIG, *_cli(items)]
        out, status, logs = submit(two_nodes, entry, runtime_env=str(RUNTIME_ENV),
                                   env=cluster_env(two_nodes["token"], **creds), timeout=900)
        (tmp_path / "job.log").write_text(logs)
        wall = time.time() - start
        stage_lines = [ln for ln in logs.splitlines()
                       if re.match(r"\s*\[lethe\]|\s*(ok|FAIL|not checked)\s|checks:", ln)]
        print("[rehearsal] the job's stage lines:\n" + "\n".join(stage_lines))
        print(f"[rehearsal] wall time (data, base, tasks, MLflow server, job): {wall:.0f} s")
        assert status == "SUCCEEDED", (out + logs)[-6000:]
        assert server.password not in out + logs  # the credential travelled by name only

        # The runtime env reached the job: every variable the shipped file sets, unchanged,
        # in the driver and in an actor on each node; the credentials by name.
        probe = json.loads(next(ln for ln in logs.splitlines() if ln.startswith("LETHE_PROBE "))
                           .split(" ", 1)[1])
        assert probe["driver_env"] == shipped_env
        assert len({a["node_id"] for a in probe["actors"]}) == 2
        for a in probe["actors"]:
            assert a["env"] == shipped_env, a
            assert a["credentials"] == ["MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME"]
        assert probe["driver_credentials"] == ["MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME"]

        # Every stage ran, the preflight first (nothing of it failed or went unchecked).
        assert re.search(r"checks: \d+ ok, 0 not checked, 0 failed", logs), logs[-4000:]
        stages = run_dir / "paper-llama3.2-1b" / "stages"
        done = {d.name: len([p for p in d.iterdir() if (p / "_SUCCESS.json").is_file()])
                for d in stages.iterdir() if d.is_dir()}
        print(f"[rehearsal] stages done: {done}")
        for name in ("base", "tokens", "reference", "scores", "partition"):
            assert done.get(name) == 1, (name, done)
        assert done.get("train") == 3 and done.get("eval") == 4, done
        for run in sorted((stages / "train").glob("*/run/metrics.json")):
            m = json.loads(run.read_text())  # 64 rows / (2 workers x 4 x 4) = 2 steps, ZeRO-2
            assert (m["steps"], m["resumed_from_step"], m["engine"]) == (2, 0, "deepspeed"), m
        # MLflow, read back with the job's credentials.
        from mlflow.tracking import MlflowClient

        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        client = MlflowClient(tracking_uri=server.uri)
        exp = client.get_experiment_by_name("paper-llama3.2-1b")
        assert exp is not None
        [parent] = client.search_runs([exp.experiment_id], "tags.`lethe.kind` = 'parent'")
        assert parent.info.status == "FINISHED"
        children = client.search_runs([exp.experiment_id], "tags.`lethe.kind` = 'run'")
        assert sorted(c.data.tags["method"] for c in children) == sorted(METHODS)
        for child in children:  # each evaluated model: all 13 paper tasks
            tasks_seen = {k.split("/")[1] for k in child.data.metrics if k.startswith("eval/")}
            assert tasks_seen == set(PAPER_TASKS), child.data.tags
        table = _headline_table(client, parent.info.run_id)
        print("[rehearsal] five-benchmark table on the MLflow parent run (mean over 1 seed):")
        print(f"  {'method':<8}" + "".join(f"{b:>12}" for b in (*BENCHMARKS, "average")))
        for m, row in table.items():
            print(f"  {m:<8}" + "".join(f"{row[b]:>12.4f}" if row[b] is not None else
                                        f"{'-':>12}" for b in (*BENCHMARKS, "average")))
        for m, row in table.items():
            assert all(row[b] is not None and 0.0 <= row[b] <= 1.0 for b in BENCHMARKS), (m, row)
            assert math.isclose(row["average"], sum(row[b] for b in BENCHMARKS) / 5,
                                rel_tol=1e-9), (m, row)
        # The table is the shipped benchmark definitions applied to each model's 13 tasks.
        from orchestrator.config import load_config
        from orchestrator.evaluation.benchmarks import benchmark_scores

        shipped = load_config(ROOT / CONFIG).evaluate.benchmarks
        for child in children:
            flat = {k[len("eval/"):]: v for k, v in child.data.metrics.items()
                    if k.startswith("eval/")}
            assert benchmark_scores(flat, shipped) == pytest.approx(
                table[child.data.tags["method"]]), child.data.tags
        logged = {f.path for f in client.list_artifacts(parent.info.run_id, "compare")}
        assert {"compare/compare.txt", "compare/compare.csv"} <= logged, logged
