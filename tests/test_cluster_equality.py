"""Two nodes give the single node's results (issue 11, item 2).

On the two-node cluster of tests/test_cluster_two_nodes.py (a head and a second `ray start`
node on 127.0.0.1, token auth, each with its own custom resource), a driver scores a tiny
corpus with 2 scoring actors and trains one model with 2 Ray Train workers, both placed with
SPREAD. Asserted from Ray's state API: the actors and the workers ran on two different
nodes, and the workers' placement group had the SPREAD strategy. The same work on the
session's one-node instance gives bit-equal scores (every block is scored by one actor with
one thread, wherever it runs) and the same trained weights within tolerance (the gradient
all-reduce now crosses nodes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_cluster_two_nodes import _env, _get, two_nodes  # noqa: F401  (the module fixture)
from test_faults import _assert_same_table
from test_scoring import _make_rows, _tiny_spec, _write_tokens
from test_training_support import make_base, make_corpus, make_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]

TRAIN = {"num_workers": 2, "micro_batch_size": 4, "grad_accum_steps": 1, "epochs": 1.0,
         "lr": 1e-2, "warmup_ratio": 0.0, "deepspeed": None, "cpus_per_worker": 0.5,
         "lambda": {"t_max": 0.5}}

DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from orchestrator.config import ScoringConfig
    from orchestrator.scoring import run_scoring
    from orchestrator.training import run_trainings
    from orchestrator.training.job import TrainJob

    address, tokens, base, ref, out, job = sys.argv[1:7]
    ray.init(address=address)
    cfg = ScoringConfig(num_actors=2, batch_size=8, token_budget=200)
    run_scoring(tokens, base, ref, cfg, out, block_rows=8)
    run_trainings([TrainJob.from_dict(json.loads(job))], placement="SPREAD")
    groups = ray.util.placement_group_table().values()
    print("LETHE_GROUPS " + json.dumps([[g["strategy"], len(g["bundles"])] for g in groups]))
    print("driver: done", flush=True)
""")


def _score_inputs(tmp: Path) -> tuple[Path, list[str]]:
    from orchestrator.models import build_model

    models = []
    for role, seed in (("base", 0), ("ref", 1)):
        build_model(_tiny_spec("llama"), 97, seed=seed).save_pretrained(str(tmp / role))
        models.append(str(tmp / role))
    return _write_tokens(_make_rows(32), tmp / "tokens.parquet"), models  # 4 blocks of 8


def _actors(dash: str, token: str, class_name: str) -> list[dict]:
    url = (f"{dash}/api/v0/actors?limit=1000&detail=1&filter_keys=class_name"
           f"&filter_predicates=%3D&filter_values={class_name}")
    return _get(url, token)["data"]["result"]["result"]


def test_two_nodes_spread_and_give_the_single_node_results(two_nodes, ray_local,  # noqa: F811
                                                           tmp_path):
    from orchestrator.config import ScoringConfig
    from orchestrator.scoring import run_scoring, score_files
    from orchestrator.training import run_trainings

    tokens, models = _score_inputs(tmp_path)
    base = make_base(tmp_path / "train-base")
    data = make_corpus(tmp_path / "corpus.parquet", n=32)
    two = make_job(tmp_path / "two", base, data, method="forget", name="two-nodes", **TRAIN)
    one = make_job(tmp_path / "one", base, data, method="forget", name="one-node", **TRAIN)

    out = subprocess.run(
        [sys.executable, "-c", DRIVER, two_nodes["gcs"], str(tokens), *models,
         str(tmp_path / "scores-two"), json.dumps(two.to_dict())],
        env=_env(two_nodes["token"]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "driver: done" in out.stdout, (out.stdout + out.stderr)[-4000:]

    # Where things ran, from the cluster's state API.
    dash, token = two_nodes["dash"], two_nodes["token"]
    scorers = _actors(dash, token, "BlockScorer")
    workers = _actors(dash, token, "RayTrainWorker")
    assert len(scorers) == 2 and len({a["node_id"] for a in scorers}) == 2, scorers
    assert len(workers) == 2 and len({a["node_id"] for a in workers}) == 2, workers
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("LETHE_GROUPS "))
    assert ["SPREAD", 2] in json.loads(line.split(" ", 1)[1]), line  # the workers' group

    # The same work on one node (the session's instance).
    run_scoring(tokens, *models, ScoringConfig(num_actors=2, batch_size=8, token_budget=200),
                tmp_path / "scores-one", block_rows=8)
    [r_one] = run_trainings([one])

    files = [score_files(tmp_path / d) for d in ("scores-two", "scores-one")]
    assert len(files[0]) == len(files[1]) == 4
    for a, b in zip(*files, strict=True):
        _assert_same_table(pq.read_table(a), pq.read_table(b))  # bit for bit
    w_two = load_file(str(two.export_dir / "model.safetensors"))
    w_one = load_file(str(Path(r_one.export_dir) / "model.safetensors"))
    assert w_two.keys() == w_one.keys()
    for k in w_two:
        torch.testing.assert_close(w_two[k], w_one[k], rtol=1e-4, atol=1e-5, msg=k)
