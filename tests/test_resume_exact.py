"""Two Ray Train workers, one SIGKILLed after a checkpoint: the worker group restarts, the
job resumes from that checkpoint and ends on exactly the weights of an uninterrupted run
(issues 11 and 12: multi-worker resume exactness, the 2-worker SIGKILL drill).

One Ray Train run holds both jobs (the cheapest way to get a reference here): job "whole"
trains uninterrupted first; job "killed" (the same config, seed and rows) is hit by a real
SIGKILL of one worker process as soon as its first checkpoint is reported. The kill is
done by a Ray Train callback on the controller (it runs when all ranks have reported the
checkpoint, while the workers wait for the controller to take their next report), so it
lands mid-run, not after the end. The workers are placed with SPREAD (one node here: both
land on it; the two-node placement is tests/test_cluster_two_nodes.py's).

The training rows come from several input files: a directory of three Parquet part files
with uneven sizes and shuffled sample ids (what a writer of part files hands over), and the
jobs train on a seeded subset of that pool (the reference model's data path). A Ray Train
worker callback records, in every worker process, which sample ids each optimizer step of
each job trained on and on which rank: the killed job's records, before and after the
restart, equal the uninterrupted job's rank by rank and step by step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_training_support import make_corpus, make_job

from orchestrator.training import run_trainings
from orchestrator.training.context import read_rank_shard
from orchestrator.training.data import select_subset
from orchestrator.training.job import SubsetSpec
from orchestrator.training.stage import loop_config

# A pool of 40 rows in three files, 32 of them drawn as the subset: 32 / 2 ranks = 16 per
# rank, micro 4: 4 steps an epoch, 8 in 2 epochs; a checkpoint every 2 steps. No dropout in
# the tiny model, so the RNG plays no part in the weights.
POOL, SUBSET = 40, SubsetSpec(size=32, seed=3)
PART_SIZES = (17, 6, 17)
COMMON = {"num_workers": 2, "micro_batch_size": 4, "grad_accum_steps": 1, "epochs": 2.0,
          "lr": 1e-2, "warmup_ratio": 0.0, "deepspeed": None, "checkpoint_every": 2,
          "max_failures": 1, "cpus_per_worker": 0.5, "lambda": {"t_max": 0.5}}


def write_parts(corpus: Path, out_dir: Path, sizes: tuple[int, ...], seed: int = 0) -> Path:
    """The corpus's rows shuffled and cut into part files of `sizes` rows (plus a stray
    `_SUCCESS.json`, which Parquet readers skip): ids are neither sorted nor contiguous
    within or across the files."""
    table = pq.read_table(corpus)
    assert sum(sizes) == table.num_rows
    order = np.random.default_rng(seed).permutation(table.num_rows)
    out_dir.mkdir(parents=True)
    start = 0
    for k, n in enumerate(sizes):
        pq.write_table(table.take(order[start:start + n]), out_dir / f"part-{k:05d}.parquet")
        start += n
    (out_dir / "_SUCCESS.json").write_text("{}")
    return out_dir


def test_rank_shards_of_part_files_equal_those_of_one_file(tmp_path):
    """No Ray: the rank shards of a directory of part files are those of the same rows in
    one file (sorted by sample_id, then rank-strided), with and without a subset."""
    one = make_corpus(tmp_path / "one.parquet", n=POOL)
    parts = write_parts(one, tmp_path / "parts", PART_SIZES)
    assert [len(pq.read_table(p)) for p in sorted(parts.glob("part-*"))] == list(PART_SIZES)
    keep = select_subset(pq.read_table(parts, columns=["sample_id"]).column("sample_id")
                         .to_numpy(), SUBSET)
    for subset in (None, keep.tolist()):
        for rank in (0, 1):
            a, b = (read_rank_shard({"train_path": str(p), "class_column": "token_class",
                                     "keep_sample_ids": subset}, rank, 2) for p in (parts, one))
            expected = np.sort(keep if subset is not None else np.arange(POOL))[rank::2]
            assert a.sample_ids.tolist() == b.sample_ids.tolist() == expected.tolist()
            assert np.array_equal(a.offsets, b.offsets)
            assert np.array_equal(a.input_ids, b.input_ids)
            assert np.array_equal(a.classes, b.classes)


class KillOneWorkerAfterCheckpoint:
    """Ray Train callback (runs in the controller): SIGKILL one RayTrainWorker process the
    first time a checkpoint of job `job` is reported (its folder is named after the job:
    training/context.RayContext.report); the pid goes to `record`."""

    def __init__(self, job: str, record: str) -> None:
        self.job, self.record = job, record

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if (checkpoint is None or f"checkpoint_{self.job}_" not in Path(checkpoint.path).name
                or Path(self.record).exists()):
            return
        import ray
        from ray.util.state import list_actors

        workers = list_actors(address=ray.get_runtime_context().gcs_address,
                              filters=[("class_name", "=", "RayTrainWorker"),
                                       ("state", "=", "ALIVE")], detail=True)
        pid = max(int(a["pid"]) for a in workers)
        Path(self.record).write_text(json.dumps({"pid": pid, "step": metrics[0]["step"],
                                                 "workers": len(workers)}))
        os.kill(pid, signal.SIGKILL)

    # The rest of Ray Train's UserCallback interface: nothing to do.
    def after_exception(self, run_context, worker_exceptions) -> None:
        pass


class RecordSampleIds:
    """Ray Train worker callback (a copy runs in every worker process, also in the restarted
    group): from then on, each optimizer step appends {job, rank, step, ids} to
    `<out_dir>/ids-<pid>.jsonl`, the ids being exactly those of the micro-batches the step
    is handed (MicroBatchStream.sample_ids of the stream the recipe trains from)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def after_init_train_context(self) -> None:
        import ray.train

        from orchestrator.training import batches, trainer

        rank = ray.train.get_context().get_world_rank()
        log = Path(self.out_dir) / f"ids-{os.getpid()}.jsonl"
        current = {"job": None}
        init, for_step = trainer.Trainer.__init__, batches.MicroBatchStream.for_step

        def named_init(self_, job, ctx):  # the job a worker trains next
            current["job"] = job.job.run_name
            init(self_, job, ctx)

        def recorded(stream, step):
            line = {"job": current["job"], "rank": rank, "step": step,
                    "ids": stream.sample_ids(step)}
            with log.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
            return for_step(stream, step)

        trainer.Trainer.__init__ = named_init
        batches.MicroBatchStream.for_step = recorded

    def before_worker_shutdown(self) -> None:
        pass


def _callbacks(job: str, record: Path, ids_dir: Path) -> list:
    from ray import cloudpickle
    from ray.train import UserCallback
    from ray.train.v2._internal.execution.callback import WorkerCallback

    # Pickled by value (with Ray's own cloudpickle): neither the controller nor the workers
    # can import this module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    kill = type("KillOneWorker", (KillOneWorkerAfterCheckpoint, UserCallback), {})
    ids = type("RecordIds", (RecordSampleIds, WorkerCallback), {})
    return [kill(job, str(record)), ids(str(ids_dir))]


def _recorded(ids_dir: Path) -> tuple[dict, dict]:
    """({(job, rank): {step: ids}}, {pid: set of jobs}); a step recorded twice (begun by the
    killed group, redone after the restart) must have had the same ids both times."""
    steps: dict[tuple[str, int], dict[int, list]] = defaultdict(dict)
    jobs_of: dict[int, set] = defaultdict(set)
    for f in ids_dir.glob("ids-*.jsonl"):
        pid = int(f.stem.split("-")[1])
        for line in f.read_text().splitlines():
            r = json.loads(line)
            jobs_of[pid].add(r["job"])
            seen = steps[(r["job"], r["rank"])].setdefault(r["step"], r["ids"])
            assert seen == r["ids"], (r, seen)
    return steps, jobs_of


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_sigkilled_after_a_checkpoint_resume_to_the_same_weights(ray_local, tmp_path,
                                                                              tiny_base):
    import ray

    base = tiny_base
    parts = write_parts(make_corpus(tmp_path / "corpus.parquet", n=POOL), tmp_path / "parts",
                        PART_SIZES)
    jobs = {}
    for name in ("whole", "killed"):
        jobs[name] = make_job(tmp_path, base, parts, method="forget", name=name, **COMMON)
        jobs[name].subset = SUBSET
    record, ids_dir = tmp_path / "killed.json", tmp_path / "ids"
    ids_dir.mkdir()
    jobs["killed"].callbacks = _callbacks("killed", record, ids_dir)

    results = run_trainings([jobs["whole"], jobs["killed"]], run_name="resume-exact",
                            storage_path=str(tmp_path / "ray"), placement="SPREAD")

    kill = json.loads(record.read_text())
    assert kill["workers"] == 2 and kill["step"] == 2  # one of two workers, after step 2
    with pytest.raises(ProcessLookupError):
        os.kill(kill["pid"], 0)
    r_whole, r_killed = results
    assert r_whole.steps == r_killed.steps == 8 == r_killed.metrics["planned_steps"]
    assert r_whole.metrics["resumed_from_step"] == 0
    assert r_killed.metrics["resumed_from_step"] >= 2  # from the checkpoint, not from zero

    a = load_file(str(Path(r_whole.export_dir) / "model.safetensors"))
    b = load_file(str(Path(r_killed.export_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)

    # Per rank, step by step, the killed job trained on the uninterrupted job's sample ids,
    # and each rank's epoch covers its rank-strided share of the subset's sorted ids.
    steps, jobs_of = _recorded(ids_dir)
    keep = np.sort(select_subset(np.arange(POOL), SUBSET))
    for rank in (0, 1):
        whole, killed = steps[("whole", rank)], steps[("killed", rank)]
        assert sorted(whole) == sorted(killed) == list(range(8)), (rank, sorted(killed))
        assert killed == whole, rank
        epoch = [i for s in range(4) for mb in whole[s] for i in mb]
        assert sorted(epoch) == keep[rank::2].tolist()
        shard = read_rank_shard(loop_config(jobs["killed"], "ray"), rank, 2)
        assert shard.sample_ids.tolist() == keep[rank::2].tolist()
    # The restarted group (worker processes that never trained "whole") resumed at the
    # checkpoint's step: it recorded steps 2..7 of "killed", not 0 and 1.
    restarted = [p for p, js in jobs_of.items() if js == {"killed"}]
    assert len(restarted) == 2 and kill["pid"] not in restarted, jobs_of
    for rank in (0, 1):
        again = set()
        for f in (ids_dir / f"ids-{p}.jsonl" for p in restarted):
            again |= {json.loads(ln)["step"] for ln in f.read_text().splitlines()
                      if json.loads(ln)["rank"] == rank}
        assert min(again) == r_killed.metrics["resumed_from_step"] and max(again) == 7, again

    # The worker group asked Ray for SPREAD placement (the GCS's placement group table
    # keeps removed groups with their strategy).
    groups = ray.util.placement_group_table().values()
    assert any(g["strategy"] == "SPREAD" and len(g["bundles"]) == 2 for g in groups), groups
