"""lm-eval on local task YAMLs: a tiny exported model, a scripted LM, and the Ray wrapper.

The paper's five benchmarks (scripted lm-eval results, the headline table) are in
tests/test_evaluation.py; the fixtures here also serve tests/test_evaluation_batches.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from orchestrator.config import EvaluateConfig
from orchestrator.evaluation import GEN_TASK, MC_TASK, evaluate_model, write_local_tasks
from orchestrator.evaluation.runner import (
    group_tasks_by_fewshot,
    normalise_metrics,
    run_lm_eval,
)

EOS = "<|endoftext|>"
MC_ROWS = [
    {"id": i, "task": "arithmetic", "question": f"What is twice {i}?",
     "choices": [str(2 * i + 1), str(2 * i), str(i), str(3 * i + 2)], "gold": 1}
    for i in range(6)
]
GEN_ROWS = [
    {"id": i, "task": "arithmetic", "question": f"What is {i} plus 1?",
     "answer": f"{i} plus 1 is {i + 1}. The answer is {i + 1}."}
    for i in range(5)
] + [{"id": 5, "task": "facts", "question": "What is pi to one decimal?", "answer": "3.1"},
     # lm-eval literal_evals a rendered target that looks like a list; a bare number and a
     # list answer must both stay strings (the synthetic list_ops answers look like this).
     {"id": 6, "task": "list_ops", "question": "Reverse the list [1, 2, 3].", "answer": "[3, 2, 1]"},
     {"id": 7, "task": "arithmetic", "question": "What is 40 + 2?", "answer": "42"}]


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_data")
    mc, gen = root / "eval_mc.jsonl", root / "eval_gen.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    gen.write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    include = write_local_tasks(mc, gen, root / "lm_eval_tasks")
    return {"mc": mc, "gen": gen, "include": Path(include), "root": root}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random tiny LLaMA + a BPE tokenizer trained here, saved as a plain HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_model")
    texts = [f"<|user|>\n{r['question']}\n<|assistant|>\n{r['answer']}{EOS}\n" for r in GEN_ROWS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOS, "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fast), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None))
    model.save_pretrained(out)
    return str(out)


def test_task_yamls_point_at_local_files_with_chat_prompt(eval_files):
    include = eval_files["include"]
    mc = yaml.safe_load((include / f"{MC_TASK}.yaml").read_text())
    gen = yaml.safe_load((include / f"{GEN_TASK}.yaml").read_text())
    assert mc["output_type"] == "multiple_choice"
    assert gen["output_type"] == "generate_until"
    assert mc["dataset_path"] == "json" == gen["dataset_path"]
    assert mc["dataset_kwargs"]["data_files"]["test"] == str(eval_files["mc"].resolve())
    assert Path(gen["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    assert mc["doc_to_text"] == "<|user|>\n{{question}}\n<|assistant|>\n"
    assert EOS in gen["generation_kwargs"]["until"] and "\n<|" in gen["generation_kwargs"]["until"]
    assert gen["generation_kwargs"]["max_gen_toks"] <= 64


def test_missing_data_file_is_reported(tmp_path, eval_files):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        write_local_tasks(tmp_path / "nope.jsonl", eval_files["gen"], tmp_path / "t")


def test_normalise_metrics_strips_filters_and_keeps_ambiguous_ones():
    out = normalise_metrics({
        "alias": "x", "acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 0.25,
        "exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.3, "sample_len": 6,
    })
    assert out == {"acc": 0.5, "acc_norm": 0.25, "exact_match_strict-match": 0.1,
                   "exact_match_flexible-extract": 0.3}


def test_group_tasks_by_fewshot():
    groups = group_tasks_by_fewshot(["a", "b", "c", "d"], {"a": 5, "c": 5, "d": 0})
    assert groups == {5: ["a", "c"], None: ["b"], 0: ["d"]}


def test_evaluate_tiny_model_writes_json(tiny_model_dir, eval_files):
    cfg = EvaluateConfig(limit=4, batch_size=4, num_fewshot={GEN_TASK: 1})
    metrics = evaluate_model(tiny_model_dir, cfg, str(eval_files["include"]))
    assert set(metrics) == {MC_TASK, GEN_TASK}
    assert set(metrics[MC_TASK]) == {"acc", "acc_norm"}
    assert set(metrics[GEN_TASK]) == {"exact_match"}
    for task_metrics in metrics.values():
        assert all(0.0 <= v <= 1.0 for v in task_metrics.values())
    saved = json.loads((Path(tiny_model_dir) / "eval_results.json").read_text())
    assert saved["metrics"] == metrics
    assert saved["lm_eval"]["n-shot"] == {MC_TASK: 0, GEN_TASK: 1}
    assert saved["model_args"]["trust_remote_code"] is False


def test_inherited_launcher_env_does_not_make_evaluation_distributed(
        tiny_model_dir, eval_files, monkeypatch):
    """A Ray worker can inherit RANK / LOCAL_RANK / MASTER_PORT (a CI run's `ray start` did,
    from a test process that had trained locally): accelerate then joined a process group on
    a port already taken and every model failed with EADDRINUSE."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        leaked = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        for key, value in leaked.items():
            monkeypatch.setenv(key, value)
        cfg = EvaluateConfig(tasks=[MC_TASK], limit=2, batch_size=2)
        metrics = evaluate_model(tiny_model_dir, cfg, str(eval_files["include"]))
    assert set(metrics) == {MC_TASK}
    assert {key: os.environ.get(key) for key in leaked} == leaked  # put back afterwards


class ScriptedLM:
    """An lm-eval LM that knows the answers: it prefers the gold choice and generates the
    gold response (or a wrong one), recording every prompt it receives."""

    def __new__(cls, wrong: bool = False):
        from lm_eval.api.model import LM

        class _Scripted(LM):
            def __init__(self):
                super().__init__()
                self.contexts: list[str] = []

            def _row(self, req, rows: list[dict]) -> dict:
                """The task row a request asks about (its context recorded)."""
                context = req.args[0]
                self.contexts.append(context)
                question = context.rsplit("<|user|>\n", 1)[1].split("\n<|assistant|>\n")[0]
                return next(r for r in rows if r["question"] == question)

            def loglikelihood(self, requests):
                out = []
                for req in requests:
                    row = self._row(req, MC_ROWS)
                    gold = row["choices"][row["gold"]] == req.args[1]
                    out.append((0.0 if gold else -5.0, gold))
                return out

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

            def generate_until(self, requests):
                out = []
                for req in requests:
                    row = self._row(req, GEN_ROWS)
                    final = row["answer"].split("The answer is")[-1].strip().rstrip(".")
                    final = "no idea" if wrong else final
                    out.append(f"Thinking it over. The answer is {final}.")
                return out

        return _Scripted()


@pytest.mark.parametrize("wrong", [False, True])
def test_scripted_lm_scores_exactly(eval_files, wrong):
    lm = ScriptedLM(wrong=wrong)
    cfg = EvaluateConfig(num_fewshot={GEN_TASK: 1})
    raw = run_lm_eval(lm, cfg, str(eval_files["include"]))
    metrics = {t: normalise_metrics(r) for t, r in raw["results"].items()}
    assert metrics[MC_TASK]["acc"] == 1.0
    assert metrics[GEN_TASK]["exact_match"] == (0.0 if wrong else 1.0)
    # Prompts follow the training chat template; the 1-shot example shows a full response
    # terminated by the EOS text, as consecutive training turns are.
    gen_ctx = [c for c in lm.contexts if "plus 1?" in c.rsplit("<|user|>", 1)[1]]
    assert gen_ctx and all(c.startswith("<|user|>\n") and c.endswith("\n<|assistant|>\n")
                           for c in lm.contexts)
    assert all(c.count("<|user|>") == 2 and "The answer is" in c and f"{EOS}\n<|user|>" in c
               for c in gen_ctx)


@pytest.mark.ray
def test_evaluate_many_spreads_models_over_ray_tasks(ray_local, tiny_model_dir, eval_files):
    from orchestrator.evaluation import evaluate_many

    cfg = EvaluateConfig(tasks=[MC_TASK], limit=3, batch_size=4, num_cpus=0.5)
    out = evaluate_many({"a": tiny_model_dir, "b": tiny_model_dir}, cfg,
                        str(eval_files["include"]))
    assert set(out) == {"a", "b"}
    # Same weights, same data: both tasks must agree exactly.
    assert out["a"] == out["b"] and 0.0 <= out["a"][MC_TASK]["acc"] <= 1.0
