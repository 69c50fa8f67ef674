"""The token inspector (`lethe inspect`): one sample's response tokens with their score,
class and noise flag, as terminal text and as a self-contained HTML page."""

from __future__ import annotations

import pytest


def test_inspect_sample_marks_classes_and_noise(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from orchestrator.tracking.inspect import inspect_sample

    vocab = {"<|endoftext|>": 0, "Q": 1, "?": 2, "A": 3, "B": 4, "C": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        tmp_path / "tok")
    nan = float("nan")
    pq.write_table(pa.table({
        "sample_id": pa.array([7, 8], pa.int64()),
        "input_ids": [[1, 2, 3, 4, 5, 0], [1, 3]],
        "response_mask": pa.array([[0, 0, 1, 1, 1, 1], [0, 1]], pa.list_(pa.int8())),
        "noise_mask": pa.array([[0, 0, 0, 1, 0, 0], [0, 0]], pa.list_(pa.int8())),
        "token_class": pa.array([[0, 0, 1, -1, 1, 1], [0, 1]], pa.list_(pa.int8())),
    }), tmp_path / "partitioned.parquet")
    (tmp_path / "scores").mkdir()  # a folder of parquet files, as Ray Data writes
    pq.write_table(pa.table({
        "sample_id": pa.array([7, 8], pa.int64()),
        "base_loss": pa.array([[nan, nan, 2.0, 1.0, 3.0, 0.5], [nan, 1.0]], pa.list_(pa.float32())),
        "ref_loss": pa.array([[nan, nan, 1.0, 3.0, 1.0, 0.5], [nan, 1.0]], pa.list_(pa.float32())),
    }), tmp_path / "scores" / "part-0.parquet")

    text, page = inspect_sample(tmp_path / "partitioned.parquet", tmp_path / "scores",
                                tmp_path / "tok", 7)
    rows = {int(line.split()[0]): line.split() for line in text.splitlines()[4:]}
    assert set(rows) == {2, 3, 4, 5}  # response tokens only
    assert rows[2][1:4] == ["'A'", "1.0000", "+"]
    assert rows[3][1:5] == ["'B'", "-2.0000", "−", "!"]  # negative and noise
    assert rows[4][1:4] == ["'C'", "2.0000", "+"] and len(rows[4]) == 4
    assert "\x1b[2mQ\x1b[0m" in text  # prompt dimmed
    assert "\x1b[48;2;33;102;172m" in text  # score +2 = the scale maximum: full blue
    assert "\x1b[48;2;178;24;43m" in text  # score -2: full red
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert page.count('class="tok noise"') == 1 and page.count('<sup class="cl">−</sup>') == 1
    with pytest.raises(KeyError, match="sample_id 99"):
        inspect_sample(tmp_path / "partitioned.parquet", tmp_path / "scores", tmp_path / "tok", 99)
