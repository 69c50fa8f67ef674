"""`lethe plan`: stage keys equal the pipeline's, nothing is computed or written, resources
are checked against the cluster and unplaceable configs are refused naming the field.
Also the checks that run before any compute (orchestrator/pipeline/preflight.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from tiny_configs import TINY

from orchestrator.config import ConfigError, ModelSpec, config_from_dict, load_config
from orchestrator.pipeline import plan as P
from orchestrator.pipeline import source_stages as D
from orchestrator.pipeline import stages as S
from orchestrator.pipeline.preflight import check_pretrained_path, check_vocabulary, looks_like_path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2.0**30


def _node(cpu: float, gpu: float = 0.0) -> dict[str, float]:
    out = {"CPU": cpu, "memory": 64 * GIB}
    if gpu:
        out["GPU"] = gpu
    return out


def _cluster(*nodes: dict[str, float]) -> tuple[dict[str, float], list[dict[str, float]]]:
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0.0) + v
    return total, list(nodes)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _paper(tmp_path, *overrides: str):
    return load_config(ROOT / "configs/paper/llama3.2-1b.yaml",
                       [f"run_dir={tmp_path / 'runs'}", *overrides])


# ------------------------------------------------------------------------- placement


def test_paper_config_is_refused_without_gpus_naming_the_fields(tmp_path):
    # data.limit: the released sample's 50k rows (a hub file is not counted before it is read)
    cfg = _paper(tmp_path, "data.limit=50000")
    plan = P.make_plan(cfg, resources=_cluster(_node(16)))
    assert not plan.placeable
    text = P.format_plan(plan)
    assert "REFUSED" in text
    assert ("train.num_workers=8 x train.gpus_per_worker=1 = 8 GPU; the cluster has 0 GPU"
            in text)
    assert "scoring.num_actors=8 x scoring.num_gpus_per_actor=1 = 8 GPU" in text
    assert "evaluate.num_gpus=1 = 1 GPU" in text
    # The paper numbers: 50k rows at most, 10k for the reference, 8 x 4 x 4 = 128 per step.
    [row] = plan.data
    assert row["train_rows"] == 50000 and row["sure"] == "<="
    assert row["reference_rows"] == 10000 and row["sequences_per_step"] == 128
    assert row["train_steps"] == 390 and row["reference_steps"] == 78
    assert row["trainings"] == 9
    # A hub dataset's commit is a shared stage of its own, looked up ahead of the base.
    assert [s.label for s in plan.stages][:6] == ["dataset", "base", "tokens", "reference",
                                                  "scores", "partition"]
    assert not any(s.cached for s in plan.stages)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_demo_config_fits_its_local_instance(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", [f"run_dir={tmp_path / 'runs'}"])
    plan = P.make_plan(cfg, resources=_cluster(_node(cfg.ray.num_cpus)))
    assert plan.placeable, plan.problems
    # synthetic + per model: base, tokens, valid tokens, reference, scores, partition, and
    # 3 methods x 3 seeds of training
    assert len(plan.stages) == 1 + 3 * 15
    assert {r["model"] for r in plan.data} == {"tiny-llama", "tiny-qwen2", "tiny-gptneo"}
    # 1200 rows, 1 worker x 16 rows per step, two epochs; the reference: a clean half of the
    # pool (600 rows, 38 micro-batches an epoch) for three epochs.
    assert all(r["train_rows"] == 1200 and r["train_steps"] == 150 and r["reference_rows"] == 600
               and r["reference_steps"] == 114 and r["trainings"] == 9 for r in plan.data)
    assert "OK: every stage can be placed" in P.format_plan(plan)
    assert not (tmp_path / "runs").exists()


def test_eight_gpu_workers_do_not_fit_four_gpus_but_fit_eight():
    cfg = config_from_dict(dict(copy.deepcopy(TINY), train={
        **TINY["train"], "num_workers": 8, "use_gpu": True, "gpus_per_worker": 1,
        "cpus_per_worker": 1}))
    asks = P.stage_asks(cfg)
    four = _cluster(*[_node(8, 1) for _ in range(4)])
    problems = P.placement_problems(asks, *four)
    assert problems == ["reference + train (Ray Train workers): train.num_workers=8 x "
                        "train.gpus_per_worker=1 = 8 GPU; the cluster has 4 GPU"]
    assert P.placement_problems(asks, *_cluster(_node(16, 4), _node(16, 4))) == []


def test_a_bundle_larger_than_every_node_is_refused():
    cfg = config_from_dict(dict(copy.deepcopy(TINY), train={
        **TINY["train"], "num_workers": 2, "use_gpu": True, "gpus_per_worker": 2}))
    problems = P.placement_problems(P.stage_asks(cfg), *_cluster(*[_node(8, 1)] * 4))
    assert problems == ["reference + train (Ray Train workers): train.gpus_per_worker=2 GPU "
                        "per bundle, but no node has that much (largest node: 1 GPU)"]


def test_use_gpu_without_a_count_asks_one_gpu_per_worker():
    cfg = config_from_dict(dict(copy.deepcopy(TINY), train={**TINY["train"], "use_gpu": True}))
    [train_ask] = [a for a in P.stage_asks(cfg) if a.stage.startswith("reference")]
    assert train_ask.each["GPU"] == 1.0 and train_ask.fields["GPU"] == "train.use_gpu"


# ------------------------------------------------------------------- keys and the cache


def _tiny_cfg(tmp_path):
    raw = copy.deepcopy(TINY)
    raw.update(name="plan-test", run_dir=str(tmp_path / "runs"))
    raw["train"] = dict(raw["train"], methods=["sft", "forget"])
    return config_from_dict(raw)


def _fake_compute(monkeypatch):
    """The expensive stage bodies replaced by markers, so the real stage functions (and so
    the real keys) run in seconds without Ray."""
    import orchestrator.partition as partition_pkg
    import orchestrator.scoring as scoring_pkg
    import orchestrator.training as training_pkg

    monkeypatch.setattr(S, "_train_into",
                        lambda st, **kw: st.mark_done({"model_path": str(st.dir), "metrics": {}}))

    def run_scoring(tokens, base, ref, cfg, out, **kw):
        Path(out).mkdir(parents=True, exist_ok=True)
        return Path(out)

    monkeypatch.setattr(scoring_pkg, "run_scoring", run_scoring)
    monkeypatch.setattr(partition_pkg, "run_partition", lambda *a, **kw: {"rho": 0.7})
    monkeypatch.setattr(training_pkg, "run_trainings", lambda jobs, **kw: [
        SimpleNamespace(export_dir=j.output_dir, metrics={}) for j in jobs])


def _pipeline_keys(cfg) -> list[tuple[str, str]]:
    """Run the chain the way orchestrator/pipeline/run.py does; the stage keys it used."""
    synthetic = D.synthetic_stage(cfg)
    rows, valid_rows, ident = D.source_rows(cfg, synthetic)
    keys = [("synthetic", synthetic.key)]
    for spec in cfg.models:
        base = S.base_stage(cfg, spec, rows, ident)
        tokens = S.tokens_stage(cfg, base, rows, ident, split="train")
        valid = S.tokens_stage(cfg, base, valid_rows, ident, split="clean_valid")
        ref = S.reference_stage(cfg, spec, base, tokens, valid)
        scores = S.score_stage(cfg, base, ref, tokens)
        part = S.partition_stage(cfg, tokens, scores)
        jobs = [(m, s) for m in cfg.train.methods for s in P._seeds(cfg)]
        done = S.train_stages(cfg, spec, base, valid, [
            S.TrainRequest(tokens if m == "sft" else part, m, s) for m, s in jobs])
        keys += [("base", base.key), ("tokens", tokens.key), ("tokens", valid.key),
                 ("reference", ref.key), ("scores", scores.key), ("partition", part.key)]
        keys += [("train", d.key) for d in done]
    return keys


@pytest.mark.slow
def test_plan_keys_are_the_pipeline_keys_and_track_the_cache(tmp_path, monkeypatch, capsys):
    cfg = _tiny_cfg(tmp_path)
    resources = _cluster(_node(4))
    before = P.make_plan(cfg, resources=resources)
    assert _files(tmp_path / "runs") == set()  # the plan wrote nothing
    assert not any(s.cached for s in before.stages)
    assert before.data[0]["sure"] == "~" and before.data[0]["train_rows"] == 96

    _fake_compute(monkeypatch)
    keys = _pipeline_keys(cfg)
    capsys.readouterr()
    after = P.make_plan(cfg, resources=resources)
    assert [(s.name, s.key) for s in before.stages] == keys
    assert [(s.name, s.key) for s in after.stages] == keys
    assert all(s.cached for s in after.stages)
    assert after.data[0]["sure"] == "="  # read from the finished tokens stage
    assert after.placeable
    # A change of rho re-partitions and re-trains forget, never re-scores.
    moved = P.make_plan(cfg.model_copy(update={"partition": cfg.partition.model_copy(
        update={"rho": 0.6})}), resources=resources)
    todo = {s.label for s in moved.stages if not s.cached}
    assert todo == {"partition", f"train forget seed {cfg.train.seed}"}


def test_plan_command_exit_status_and_output(tmp_path, monkeypatch, capsys):
    from orchestrator import cli

    monkeypatch.setattr(P, "cluster_view",
                        lambda cfg, address=None: (*_cluster(_node(2)), "test cluster"))
    rc = cli.main(["plan", str(ROOT / "configs/paper/llama3.2-1b.yaml"),
                   f"run_dir={tmp_path / 'runs'}"])
    out = capsys.readouterr().out
    assert rc == 1 and "REFUSED" in out and "train.gpus_per_worker=1" in out
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(copy.deepcopy(TINY), run_dir=str(tmp_path / "r"))))
    assert cli.main(["plan", str(cfg_path)]) == 0
    assert "OK: every stage can be placed" in capsys.readouterr().out


@pytest.mark.ray
def test_plan_reads_the_live_cluster(ray_local, tmp_path):
    cfg = config_from_dict(dict(copy.deepcopy(TINY), run_dir=str(tmp_path / "runs")))
    plan = P.make_plan(cfg)
    assert plan.cluster["CPU"] == ray_local.cluster_resources()["CPU"]
    assert plan.placeable, plan.problems
    big = config_from_dict(dict(copy.deepcopy(TINY), run_dir=str(tmp_path / "runs"),
                                scoring={**TINY["scoring"], "num_actors": 64}))
    assert any("scoring.num_actors=64" in p for p in P.make_plan(big).problems)


# ------------------------------------------------------------------------- preflight


@pytest.mark.parametrize("value, expected", [
    ("/mnt/shared/models/llama", True), ("./ckpt", True), ("~/models/x", True),
    ("../x", True), ("runs/a/b", True), ("meta-llama/Llama-3.2-1B", False),
    ("Qwen/Qwen2.5-3B", False), ("gpt2", False),
])
def test_looks_like_path(value, expected):
    assert looks_like_path(value) is expected


def test_existing_parent_folder_makes_it_a_path(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert looks_like_path("models/llama")
    with pytest.raises(ConfigError, match=r"'models/llama' does not exist; the nearest existing"):
        check_pretrained_path(ModelSpec(name="m", family="llama", pretrained="models/llama"))


def test_missing_local_pretrained_path_fails_before_the_base_stage_is_marked(tmp_path):
    raw = {"name": "p", "run_dir": str(tmp_path / "runs"),
           "data": {"source": "file", "path": str(tmp_path / "rows.jsonl")},
           "models": [{"name": "gone", "family": "llama",
                       "pretrained": "/mnt/nowhere/llama-3.2-1b"},
                      {"name": "hub", "family": "llama", "pretrained": "meta-llama/Llama-3.2-1B"}]}
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    cfg = config_from_dict(raw)
    with pytest.raises(ConfigError, match=r"pretrained: local path '/mnt/nowhere/llama-3.2-1b'"):
        S.base_stage(cfg, cfg.models[0], str(tmp_path / "rows.jsonl"), {})
    assert not list((tmp_path / "runs").rglob("_SUCCESS.json"))
    plan = P.make_plan(cfg, resources=_cluster(_node(8)))
    assert any("models[0] ('gone').pretrained" in p for p in plan.problems)
    assert [s.model for s in plan.stages if s.name == "base"] == ["hub"]


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        check_pretrained_path(ModelSpec(name="m", family="llama",
                                        pretrained=str(tmp_path / "empty")))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny llama saved with its 300-token tokenizer, and a 400-token tokenizer folder."""
    from orchestrator.models import materialize_base, train_tokenizer

    root = tmp_path_factory.mktemp("vocab")
    texts = [f"<|user|>\nhow many {i} apples?\n<|assistant|>\nThere are {i * 7} apples."
             for i in range(300)]
    spec = ModelSpec(name="t", family="llama", tokenizer_vocab_size=300,
                     from_config={"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                  "num_kv_heads": 1, "intermediate_size": 32})
    model_dir = materialize_base(spec, texts, root / "model")
    train_tokenizer(texts, vocab_size=400, out_dir=root / "tok400")
    return Path(model_dir), root / "tok400"


def test_tokenizer_override_with_another_vocabulary_is_refused(tiny_models):
    from orchestrator.models import load_tokenizer

    model_dir, other = tiny_models
    spec = ModelSpec(name="t", family="llama", pretrained=str(model_dir), tokenizer=str(other))
    tok = load_tokenizer(spec, str(model_dir))  # what the tokens stage uses
    with pytest.raises(ConfigError, match="different vocabulary"):
        check_vocabulary(spec, str(model_dir), tok)
    own = ModelSpec(name="t", family="llama", pretrained=str(model_dir))
    check_vocabulary(own, str(model_dir), tok)  # the model's own tokenizer passes


def test_tokenizer_larger_than_the_embedding_is_refused(tiny_models):
    from orchestrator.models import load_tokenizer

    model_dir, other = tiny_models
    spec = ModelSpec(name="t", family="llama", pretrained=str(model_dir))
    big = load_tokenizer(spec, str(other))
    with pytest.raises(ConfigError, match=r"tokenizer has \d+ tokens but the model .* embeds"):
        check_vocabulary(spec, str(model_dir), big)
