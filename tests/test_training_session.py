"""A training session: ONE Ray Train run started before its jobs exist, fed a first job, then
more jobs later (as the pipeline feeds the reference, then the method x seed jobs after
scoring). A job that fails once restarts the worker group, which replays the feed: the
finished job is skipped, the failed one resumes from its checkpoint. Every export equals the
same job trained alone without Ray. A job that fails once more (the run's failure budget is
spent) ends the run, and the driver waiting for that job hears of it (one Ray Train start
serves both: a separate failing run cost ~25 s on the 2-core machine)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from test_training_support import exported_weights, make_corpus, make_job

from orchestrator.training import run_training_local
from orchestrator.training.loop import FAIL_MARKER
from orchestrator.training.session import JobFeed, TrainingSession, session_name

COMMON = {"num_workers": 1, "micro_batch_size": 8, "grad_accum_steps": 1, "epochs": 1.0,
          "lr": 1e-2, "warmup_ratio": 0.0, "deepspeed": None, "checkpoint_every": 2,
          "max_failures": 1, "lambda": {"t_max": 0.5}}


def test_feed_is_read_by_index_and_ends_when_closed():
    feed = JobFeed()
    assert feed.get(0) == ("wait", None)
    assert feed.put({"run_name": "a"}) == 0
    assert feed.get(0) == ("job", {"run_name": "a"})
    assert feed.get(0) == ("job", {"run_name": "a"})  # replayable: a restarted rank reads it again
    assert feed.get(1) == ("wait", None)
    feed.close()
    assert feed.get(1) == ("end", None)
    with pytest.raises(RuntimeError, match="closed"):
        feed.put({})


def test_a_failure_inside_the_session_keeps_its_error_and_names_the_close_error(caplog):
    """The body fails and ending the run fails too: the body's error propagates, carrying the
    run's error as a note, and the log says it (it was dropped)."""
    session = TrainingSession("t", "/tmp/unused")
    session._error = OSError("worker 0 died")  # what the run's thread recorded

    with caplog.at_level("WARNING", logger="orchestrator.training.session"):
        with pytest.raises(ValueError, match="job failed") as info:
            with session:
                raise ValueError("job failed")
    assert "and ending the run: training session t failed: worker 0 died" in info.value.__notes__
    assert "training session t failed: worker 0 died (while handling ValueError: job failed)" in (
        caplog.text)
    session.close()  # the error was reported once, not kept for the next close


def test_session_name_is_stable_and_names_the_family():
    assert session_name("tiny-llama", "k1", "k2") == session_name("tiny-llama", "k1", "k2")
    assert session_name("tiny-llama", "k1", "k2") != session_name("tiny-llama", "k1", "k3")
    assert session_name("tiny-llama", "k1").startswith("tiny-llama-session-")


@pytest.mark.ray
@pytest.mark.slow
def test_one_run_serves_jobs_fed_over_time_and_resumes_after_a_failure(ray_local, tmp_path,
                                                                          tiny_base):
    base = tiny_base
    data = make_corpus(tmp_path / "corpus.parquet", n=32)
    ref = make_job(tmp_path / "s", base, data, method="sft", name="s-ref", **COMMON)
    sft = make_job(tmp_path / "s", base, data, method="sft", name="s-sft", seed=1, **COMMON)
    forget = make_job(tmp_path / "s", base, data, method="forget", name="s-forget", **COMMON)
    forget.test_hooks = {"_fail_once_at_step": 2}
    bad = make_job(tmp_path / "s", base, data, method="forget", name="bad",
                   **{**COMMON, "max_steps": 3})
    bad.test_hooks = {"_fail_once_at_step": 2}  # raises right after step 2's checkpoint

    session = TrainingSession("family-session", tmp_path / "session-run")
    with pytest.raises(RuntimeError, match="job bad did not finish"):
        with session:
            session.prestart(ref.train_config())  # the worker group starts with no job yet
            time.sleep(1.0)
            (r_ref,) = session.train([ref])
            assert r_ref.steps == 4 and r_ref.metrics["run_first_job"]
            r_sft, r_forget = session.train([sft, forget])  # fed after the first finished
            # max_failures=1 was spent on forget's failure: bad's failure ends the run.
            session.train([bad])
    assert (Path(bad.storage_path) / bad.run_name / FAIL_MARKER).exists()

    assert (Path(forget.storage_path) / forget.run_name / FAIL_MARKER).exists()  # it did fail
    assert r_forget.metrics["resumed_from_step"] == 2
    assert r_sft.metrics["resumed_from_step"] == 0  # not trained again after the restart
    for r in (r_ref, r_sft, r_forget):
        assert r.metrics["run_session"] == "family-session"
        assert r.metrics["run_started_at"] >= session.started_at
        assert r.metrics["planned_steps"] == r.steps == 4
    assert not r_sft.metrics["run_first_job"]
    assert r_ref.metrics["run_started_at"] >= session.started_at + 1.0  # fed after the sleep
    assert r_sft.metrics["timing"]["start"] >= r_ref.metrics["timing"]["end"]

    for job, got in ((forget, r_forget),):  # the resumed one: same weights as uninterrupted
        alone = run_training_local(make_job(tmp_path / "alone", base, data, method=job.method,
                                            name=f"a-{job.method}", seed=job.train_config().seed,
                                            **COMMON))
        a, b = exported_weights(got), exported_weights(alone)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{job.method}: {k}")

    # Finished jobs come back from disk: no run is started for them.
    again = TrainingSession("family-session", tmp_path / "session-run")
    with again:
        assert all(r.cached for r in again.train([ref, sft, forget]))
    assert again.started_at is None
