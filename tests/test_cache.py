"""Content-addressed stage directories."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cache import (
    Stage,
    StageLockTimeout,
    atomic_path,
    atomic_write_json,
    content_hash,
    parquet_problem,
    path_fingerprint,
    temp_path,
    validate_parquet,
)

ROOT = Path(__file__).resolve().parents[1]


def test_hash_ignores_key_order_and_sees_values():
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})


def test_stage_done_only_after_marker(tmp_path):
    st = Stage(tmp_path, "score", {"model": "x", "rho": 0.7})
    assert not st.done()
    d = st.prepare()
    assert (d / "inputs.json").is_file() and not st.done()
    st.mark_done({"tokens": 5})
    assert st.done() and st.summary()["tokens"] == 5
    other = Stage(tmp_path, "score", {"model": "x", "rho": 0.8})
    assert other.dir != st.dir and not other.done()


def test_path_fingerprint_changes_when_file_rewritten(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text("a\n")
    first = path_fingerprint(f)
    time.sleep(1.1)
    f.write_text("ab\n")
    assert path_fingerprint(f) != first
    assert path_fingerprint(tmp_path / "missing")["missing"] is True


# ----------------------------------------------------------------------------- content keys


def test_path_fingerprint_sees_a_same_size_rewrite_within_one_second(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text("ab\n")
    st = f.stat()
    first = path_fingerprint(f)
    f.write_text("ba\n")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only bytes differ
    assert path_fingerprint(f) != first
    copy = tmp_path / "copy" / "data.jsonl"
    copy.parent.mkdir()
    shutil.copy(f, copy)
    assert path_fingerprint(copy) == path_fingerprint(f)  # content, not location
    d1 = path_fingerprint(tmp_path / "copy")
    (tmp_path / "copy" / "extra.txt").write_text("x")
    assert path_fingerprint(tmp_path / "copy") != d1


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_only_the_final_file(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert temp_path(tmp_path / "a.json") != temp_path(tmp_path / "a.json")


def test_failed_atomic_write_removes_its_temp_and_names_the_file(tmp_path):
    with pytest.raises(OSError, match=r"disk gone \(writing .*out.bin\)") as err:
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "disk gone")
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_open_cleans_temp_files_of_a_killed_run(tmp_path):
    st = Stage(tmp_path, "score", {"k": 1})
    st.open()
    (st.dir / "scores").mkdir()
    stale = [st.dir / "scores" / "_part-00001.parquet.4242.0123abcd.tmp",
             st.dir / "_SUCCESS.json.tmp", st.dir / "scores" / "_part-00002.parquet.tmp"]
    for p in stale:
        p.write_text("half")
    keep = st.dir / "scores" / "part-00000.parquet"
    keep.write_text("done")
    st.release()
    assert st.open() is False
    assert not any(p.exists() for p in stale) and keep.exists()
    st.mark_done()


# ----------------------------------------------------------------------------- validation


def test_validate_parquet_reads_footer_and_row_count(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"sample_id": pa.array(range(10), pa.int64())}), path)
    assert validate_parquet(path, 10) and validate_parquet(path)
    assert not validate_parquet(path, 11)
    assert "10 rows, expected 11" in parquet_problem(path, 11)
    path.write_bytes(path.read_bytes()[:-30])
    assert not validate_parquet(path, 10) and "unreadable footer" in parquet_problem(path)
    assert parquet_problem(tmp_path / "none.parquet") == "missing"


# ----------------------------------------------------------------------------- locks

# The worker computes the stage and holds its lock until the file `release` appears in the
# stage root (the test creates it when it has seen what it waits for): no fixed sleep whose
# length a loaded machine could outlast.
_WORKER = """
import sys, time, json
from pathlib import Path
from orchestrator.cache import Stage
root = Path(sys.argv[1])
st = Stage(root, "score", {"k": 1})
if st.open():
    print("cached", flush=True)
else:
    with open(root / "computed.log", "a") as fh:
        fh.write("computed\\n")
    print("computing", flush=True)
    while not (root / "release").exists():
        time.sleep(0.02)
    (st.dir / "out.txt").write_text("result")
    st.mark_done({"by": "worker"})
    print("done", flush=True)
"""


def _spawn(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait_for_file(path: Path, proc: subprocess.Popen) -> None:
    """Until `path` exists (the worker got that far) or the worker ended without it."""
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)


def _read_until(proc: subprocess.Popen, text: str) -> str:
    """The process's output up to and including the first line holding `text`."""
    seen = ""
    while text not in seen:
        line = proc.stdout.readline()
        assert line, f"ended before printing {text!r}: {seen}"
        seen += line
    return seen


def _stop(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return out


def test_two_processes_on_one_stage_compute_it_once(tmp_path):
    first = _spawn(tmp_path)
    _wait_for_file(tmp_path / "computed.log", first)  # the first holds the lock now
    second = _spawn(tmp_path)
    waited = _read_until(second, "waiting")  # the second is blocked on the first's lock
    (tmp_path / "release").touch()
    out1, out2 = _stop(first), waited + _stop(second)
    assert first.returncode == 0 and second.returncode == 0, (out1, out2)
    assert (tmp_path / "computed.log").read_text() == "computed\n"
    assert "done" in out1 and "cached" in out2
    assert f"another run (pid {first.pid}" in out2 and "waiting" in out2
    assert Stage(tmp_path, "score", {"k": 1}).summary()["by"] == "worker"


def test_lock_wait_times_out_clearly_and_a_killed_holder_frees_it(tmp_path):
    holder = _spawn(tmp_path)  # never released: killed below
    try:
        _wait_for_file(tmp_path / "computed.log", holder)
        st = Stage(tmp_path, "score", {"k": 1})
        with pytest.raises(StageLockTimeout, match=rf"another run \(pid {holder.pid} .*more than 0 s"):
            st.open(timeout=0.3)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crashed run: the kernel drops its lock
        holder.wait()
    assert st.open(timeout=5) is False  # not done: this run takes over at once
    st.mark_done()
    assert st.done()


def test_lock_is_reentrant_per_thread_and_taken_over_from_a_dead_thread(tmp_path):
    st = Stage(tmp_path, "train", {"k": 2})

    def failing_worker() -> None:
        assert st.open() is False  # locks, then "fails" without mark_done

    t = threading.Thread(target=failing_worker)
    t.start()
    t.join()
    assert st.lock.held_here()
    assert st.open(timeout=1) is False  # the dead thread's lock passes to this one
    assert st.open(timeout=1) is False  # re-entrant
    st.mark_done()
    assert not st.lock.held_here()


def test_big_file_hashes_are_memoised_on_disk(tmp_path, monkeypatch):
    import orchestrator.hashing as hashing

    memo = tmp_path / "memo.jsonl"
    monkeypatch.setenv("LETHE_HASH_MEMO", str(memo))
    monkeypatch.setattr(hashing, "_DISK_MEMO_MIN_BYTES", 10)
    monkeypatch.setattr(hashing, "_FILE_HASHES", {})
    monkeypatch.setattr(hashing, "_disk_memo_loaded", False)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0123456789abcdef")
    digest = hashing.file_sha256(f)
    assert len(memo.read_text().splitlines()) == 1
    monkeypatch.setattr(hashing, "_FILE_HASHES", {})  # a new process: only the disk memo
    monkeypatch.setattr(hashing, "_disk_memo_loaded", False)
    monkeypatch.setattr(hashing.hashlib, "sha256", None)  # hashing again would fail
    assert hashing.file_sha256(f) == digest
