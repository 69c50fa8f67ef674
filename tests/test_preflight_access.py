"""`lethe plan CONFIG --check` (orchestrator/pipeline/access.py, eval_access.py): one line per
thing a run reads, `ok` / `FAIL` / `not checked`, exit 1 on a failure; `lethe run
--preflight` (jobs.pipeline) stops on a failure before Ray starts.

The shipped paper config is checked as shipped apart from run_dir (a folder of the test):
offline, every hub source says it was not opened. Local files and folders are checked for
real offline: a tiny saved model, a JSONL training file, lm-eval task YAMLs reading local
JSONL through datasets' json builder, a dataset folder holding a loading script (datasets
>= 4 refuses it: the error lm-eval's logiqa meets on the hub).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper" / "llama3.2-1b.yaml"
MESSAGES = [{"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(5)]


@pytest.fixture()
def offline(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _lines(out: str, status: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(f"  {status} ")]


def test_paper_config_offline_says_what_it_could_not_check(offline, tmp_path, capsys):
    from orchestrator.cli import main

    rc = main(["plan", str(PAPER), f"run_dir={tmp_path}", "--check"])
    out = capsys.readouterr().out
    print(out)
    cfg = load_config(PAPER)
    assert rc == 0, out  # nothing failed; what was not opened is said, not passed
    skipped = _lines(out, "not checked")
    assert not _lines(out, "FAIL")
    # the training data, the model, and each of the 13 evaluation tasks: one line each
    assert len(cfg.evaluate.tasks) == 13
    assert len(skipped) == 2 + 13, out
    assert all("HF_HUB_OFFLINE=1" in ln and "not opened" in ln for ln in skipped)
    assert any(" data " in ln and cfg.data.path in ln for ln in skipped)
    assert any("model llama3.2-1b" in ln and "meta-llama/Llama-3.2-1B" in ln for ln in skipped)
    for task in cfg.evaluate.tasks:
        assert sum(f"eval {task} " in ln for ln in skipped) == 1, task
    assert _lines(out, "ok") and "mlflow" in _lines(out, "ok")[0]
    assert out.strip().splitlines()[-1] == "checks: 1 ok, 15 not checked, 0 failed"


@pytest.fixture(scope="module")
def local_sources(tmp_path_factory) -> dict[str, Path]:
    """A tiny saved llama with its tokenizer, a JSONL training file, lm-eval task YAMLs over
    local JSONL, and a dataset folder that needs a loading script."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from orchestrator.evaluation.tasks import write_local_tasks

    root = tmp_path_factory.mktemp("access")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([m["messages"][0]["content"] for m in MESSAGES] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=32)).save_pretrained(model_dir)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in MESSAGES))
    mc, gen = root / "eval_mc.jsonl", root / "eval_gen.jsonl"
    mc.write_text(json.dumps({"id": "0", "task": "add", "question": "1 + 1?",
                              "choices": ["1", "2", "3", "4"], "gold": 1}) + "\n")
    gen.write_text(json.dumps({"id": "0", "task": "add", "question": "1 + 1?",
                               "answer": "2"}) + "\n")
    tasks = Path(write_local_tasks(mc, gen, root / "tasks"))
    script_ds = root / "scripted" / "logiqa"
    script_ds.mkdir(parents=True)
    (script_ds / "logiqa.py").write_text("import datasets  # a loading script\n")
    return {"model": model_dir, "train": train, "tasks": tasks, "script_ds": script_ds,
            "root": root}


def _config_file(tmp_path: Path, src: dict[str, Path], **changes: object) -> Path:
    cfg = {"name": "access", "run_dir": str(tmp_path / "runs"),
           "data": {"source": "file", "path": str(src["train"]), "format": "messages"},
           "models": [{"name": "tiny", "family": "llama", "pretrained": str(src["model"])}],
           "evaluate": {"tasks": ["lethe_synth_mc", "lethe_synth_gen"],
                        "include_path": str(src["tasks"])}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    path = tmp_path / "access.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_local_sources_are_checked_offline_and_pass(offline, local_sources, tmp_path, capsys):
    from orchestrator.cli import main

    rc = main(["plan", str(_config_file(tmp_path, local_sources)), "--check"])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
    ok = _lines(out, "ok")
    assert len(ok) == 5 and not _lines(out, "not checked") and not _lines(out, "FAIL"), out
    data, model, mc, gen, mlflow = ok
    assert "(local)" in data and "['messages']" in data and "data.format=messages" in data
    assert "LlamaConfig" in model and "tokens" in model
    assert "builder json" in mc and "test: first row has" in mc and "task YAML in" in mc
    assert "eval lethe_synth_gen" in gen and "sqlite" in mlflow


def test_wrong_local_data_path_is_one_failed_line(offline, local_sources, tmp_path, capsys):
    from orchestrator.cli import main

    path = _config_file(tmp_path, local_sources,
                        data__path=str(local_sources["root"] / "trian.jsonl"))
    rc = main(["plan", str(path), "--check"])
    out = capsys.readouterr().out
    print(out)
    assert rc == 1
    [fail] = _lines(out, "FAIL")
    assert " data " in fail and "trian.jsonl" in fail and "no such file or folder" in fail
    assert out.strip().splitlines()[-1] == "checks: 4 ok, 0 not checked, 1 failed"


def test_rows_that_do_not_fit_data_format_fail_naming_the_format(offline, local_sources, tmp_path):
    from orchestrator.pipeline.access import FAIL, check_training_data

    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "1 + 1?", "completion": "2"}) + "\n")
    cfg = load_config(_config_file(tmp_path, local_sources, data__path=str(pc)))
    check = check_training_data(cfg, "offline")
    assert check.status == FAIL
    assert "data.format=messages" in check.detail and "['completion', 'prompt']" in check.detail


def test_script_dataset_and_unknown_task_fail_by_name(offline, local_sources, tmp_path):
    """An eval task whose dataset needs a loading script fails with datasets' own words; a
    task name nobody defines fails naming the include path searched."""
    from orchestrator.pipeline.access import FAIL
    from orchestrator.pipeline.eval_access import check_eval_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "logiqa.yaml").write_text(yaml.safe_dump({
        "task": "logiqa", "dataset_path": str(local_sources["script_ds"]),
        "dataset_name": "logiqa", "output_type": "multiple_choice", "test_split": "test",
        "doc_to_text": "{{context}}", "doc_to_target": 0, "doc_to_choice": "{{options}}",
        "metric_list": [{"metric": "acc"}]}))
    cfg = load_config(_config_file(tmp_path, local_sources, evaluate__tasks=["logiqa", "nope_task"],
                                   evaluate__include_path=str(tasks)))
    logiqa, nope = check_eval_tasks(cfg, "offline")
    assert logiqa.status == FAIL and "Dataset scripts are no longer supported" in logiqa.detail
    assert "task YAML in" in logiqa.detail
    assert nope.status == FAIL and "'nope_task' is not a task" in nope.detail
    assert str(tasks) in nope.detail


def test_wrong_hub_dataset_name_is_one_failed_line(monkeypatch, local_sources, tmp_path):
    """With the hub reachable, what datasets raises for an unknown name becomes the line
    (the hub itself is out of reach here: datasets' builder is replaced by one raising the
    hub's answer for a name that does not exist)."""
    import datasets

    from orchestrator.pipeline import access

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(access, "hub_unreachable", lambda: None)
    monkeypatch.setattr("orchestrator.data.loading.resolve_dataset_revision", lambda *a, **k: None)

    def not_found(name, *args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(
            f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset_builder", not_found)
    cfg = load_config(_config_file(tmp_path, local_sources, data__source="hf",
                                   data__path="allenai/tulu-v2-sft-mixtrue"))
    check = access.check_training_data(cfg, None)
    assert check.status == access.FAIL
    assert check.detail == ("allenai/tulu-v2-sft-mixtrue: DatasetNotFoundError: Dataset "
                            "'allenai/tulu-v2-sft-mixtrue' doesn't exist on the Hub or cannot "
                            "be accessed.")
    assert "\n" not in check.line()


def test_run_preflight_stops_before_ray(offline, local_sources, tmp_path, monkeypatch):
    from orchestrator.errors import LetheError
    from orchestrator.pipeline import run

    def no_ray(cfg):
        raise AssertionError("Ray was started although a check failed")

    monkeypatch.setattr(run, "init_ray", no_ray)
    cfg = load_config(_config_file(tmp_path, local_sources,
                                   data__path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(LetheError, match=r"preflight: 1 check\(s\) failed .*data: data.path"):
        run.run_pipeline(cfg, preflight=True)


def test_jobs_pipeline_runs_with_preflight(monkeypatch):
    import jobs._entry

    seen = []
    monkeypatch.setattr(jobs._entry, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", ["jobs.pipeline", "--config", "c.yaml", "train.lr=1"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("jobs.pipeline", run_name="__main__")
    assert done.value.code == 0
    assert seen == [["run", "c.yaml", "train.lr=1", "--preflight"]]


@pytest.mark.slow
def test_mlflow_server_with_authentication_refuses_wrong_credentials(offline, local_sources,
                                                                    tmp_path, monkeypatch):
    """`mlflow server --app-name basic-auth` (tests/mlflow_auth_server.py): wrong or missing
    credentials are a named failure of the check and of the run's start-up check; the
    server's own account passes."""
    from mlflow_auth_server import mlflow_auth_server

    from orchestrator.pipeline.access import FAIL, OK, check_mlflow
    from orchestrator.tracking.uri import TrackingError, check_reachable

    cfg = load_config(_config_file(tmp_path, local_sources))
    with mlflow_auth_server(tmp_path / "mlflow") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        missing = check_mlflow(cfg)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password + "x")
        wrong = check_mlflow(cfg)
        with pytest.raises(TrackingError, match="HTTP 401"):
            check_reachable(server.uri)  # what Tracker.open runs before any stage
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
        right = check_mlflow(cfg)
        check_reachable(server.uri)
    assert missing.status == FAIL and "requires the credentials (HTTP 401" in missing.detail
    assert "sent: no credentials" in missing.detail
    assert wrong.status == FAIL and "rejected the credentials (HTTP 401" in wrong.detail
    assert "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" in wrong.detail
    assert server.password not in wrong.detail
    assert right.status == OK and "accepts the credentials" in right.detail
    assert server.proc.poll() is not None  # stopped


def test_first_row_of_a_json_array_is_read_from_its_head(tmp_path):
    from orchestrator.pipeline.access import first_json_array_row

    array = tmp_path / "rows.json"
    array.write_text("\ufeff[\n  " + ",\n  ".join(json.dumps(r) for r in MESSAGES) + "\n]\n")
    def opener(path):
        return lambda: path.open("rb")

    assert first_json_array_row(opener(array)) == MESSAGES[0]
    assert first_json_array_row(opener(array), head_bytes=40) is None  # longer than the head
    lines = tmp_path / "rows.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in MESSAGES))
    assert first_json_array_row(opener(lines)) is None  # not an array: the caller streams


def test_the_papers_hub_json_file_is_checked_from_its_head(monkeypatch, tmp_path, local_sources):
    """The paper's data (a hub repository's one JSON file, data.data_files) with the hub
    reachable: the builder is asked for, the first row comes from the file's first bytes
    (datasets would parse the whole 50k-row array even when streaming) and is checked
    against data.format. The hub is replaced by a builder stub and a local copy of the
    file's head."""
    import datasets

    from orchestrator.pipeline import access

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(access, "hub_unreachable", lambda: None)
    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr("orchestrator.data.loading.resolve_dataset_revision",
                        lambda name, rev, **k: commit)
    asked = {}

    class Builder:
        name = "json"

        def as_streaming_dataset(self, split):
            raise AssertionError("the whole JSON file would be read")

    def builder(name, **kwargs):
        asked.update(kwargs, name=name)
        return Builder()

    local = tmp_path / "tulu_50k_sample.json"
    local.write_text(json.dumps(MESSAGES))
    opened = []
    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    monkeypatch.setattr(access, "_hub_file", lambda name, rev, file: opened.append(
        (name, rev, file)) or local.open("rb"))
    cfg = load_config(PAPER, [f"run_dir={tmp_path}"])  # as shipped but the run directory
    check = access.check_training_data(cfg, None)
    assert check.status == access.OK, check.detail
    assert asked == {"name": "Aligh1380/forgetting-llm-dataset", "revision": commit,
                     "data_files": "tulu_50k_sample.json"}
    assert opened == [("Aligh1380/forgetting-llm-dataset", commit, "tulu_50k_sample.json")]
    assert check.detail.startswith(f"Aligh1380/forgetting-llm-dataset@{commit[:12]} (what the "
                                   "default branch names now; the run pins it) file "
                                   "tulu_50k_sample.json, builder json, split train")
    assert "fits data.format=messages" in check.detail
