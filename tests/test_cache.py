"""Content-addressed stage directories."""

from __future__ import annotations

import time

from orchestrator.cache import Stage, content_hash, path_fingerprint


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
