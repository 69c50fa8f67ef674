"""lm-eval task YAMLs for the embedded default's own held-out tasks.

Two tasks are written, both reading local JSONL files (no hub access):

* `lethe_synth_mc`  - multiple choice, rows {"id", "task", "question", "choices": [4], "gold": int};
  scored by log-likelihood of each choice after the prompt (acc, acc_norm).
* `lethe_synth_gen` - generate_until, rows {"id", "task", "question", "answer"}; the final answer
  is pulled out of "... The answer is X." on both sides and compared with exact_match.

Prompts use the paper's chat template, exactly as the model saw it in training:
`<|user|>\\n{question}\\n<|assistant|>\\n{answer}<eos>\\n`. The target therefore follows the
prompt with no delimiter (the prompt already ends in a newline), and few-shot examples are
separated by the EOS text plus newline, as consecutive training turns are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

MC_TASK = "lethe_synth_mc"
GEN_TASK = "lethe_synth_gen"
# The validation questions (data.synthetic.num_valid > 0): the same tasks on valid_mc.jsonl /
# valid_gen.jsonl, for a sweep to select on without touching the test questions.
VALID_SUFFIX = "_valid"
EOS_TEXT = "<|endoftext|>"
USER_TAG = "<|user|>"
ASSISTANT_TAG = "<|assistant|>"

# Jinja prompt shared by both tasks (lm-eval renders doc_to_text with Jinja2).
CHAT_PROMPT = USER_TAG + "\n{{question}}\n" + ASSISTANT_TAG + "\n"

# Final-answer extraction from a generation "... The answer is X." - the last such phrase wins
# (findall + group_select -1); a trailing full stop is not part of the answer, but inner dots
# are ("3.5"). The lookahead stops at the end of the line or at the next chat tag.
FINAL_ANSWER_REGEX = r"The answer is\s*(.+?)\.?\s*(?=\n|<\||$)"
# The gold side: rows may hold the bare answer ("42") or a full response ending in
# "The answer is 42." - both reduce to "42" (gold_answer). The reduced answer is written to a
# `target` column and named as a feature: lm-eval returns a feature's value untouched, while
# a rendered template that looks like a list ("[3, 1, 2]") is literal_eval'd into a Python
# list, which its exact_match then rejects as a non-string reference.
GOLD_FIELD = "target"
# Few-shot examples show the full response, so the model imitates "... The answer is X.";
# a bare gold answer is wrapped into that phrase.
FEWSHOT_RESPONSE_JINJA = (
    "{% if 'The answer is' in answer %}{{answer}}{% else %}The answer is {{answer}}.{% endif %}"
)
GEN_FILTER_NAME = "final-answer"
MAX_GEN_TOKS = 48


def _data_block(jsonl_path: str | Path) -> dict[str, Any]:
    path = Path(jsonl_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data file not found: {path}")
    # dataset_path "json" is the generic datasets loader: the file is read locally, and
    # the few-shot examples are drawn from the same split (they exclude the doc itself).
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "fewshot_split": "test",
    }


def mc_task_config(eval_mc_path: str | Path, task: str = MC_TASK) -> dict[str, Any]:
    """The lm-eval config dict for the multiple-choice task."""
    return {
        "task": task,
        **_data_block(eval_mc_path),
        "output_type": "multiple_choice",
        "doc_to_text": CHAT_PROMPT,
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": "",
        "fewshot_delimiter": EOS_TEXT + "\n",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def gen_task_config(eval_gen_path: str | Path, task: str = GEN_TASK) -> dict[str, Any]:
    """The lm-eval config dict for the generate-until task."""
    return {
        "task": task,
        **_data_block(eval_gen_path),
        "output_type": "generate_until",
        "doc_to_text": CHAT_PROMPT,
        "doc_to_target": GOLD_FIELD,
        "fewshot_config": {"sampler": "first_n", "doc_to_target": FEWSHOT_RESPONSE_JINJA},
        "target_delimiter": "",
        "fewshot_delimiter": EOS_TEXT + "\n",
        "generation_kwargs": {
            # EOS text and the start of the next chat tag both end the assistant turn.
            "until": [EOS_TEXT, "\n<|", USER_TAG],
            "max_gen_toks": MAX_GEN_TOKS,
            "do_sample": False,
            "temperature": 0.0,
        },
        "filter_list": [
            {
                "name": GEN_FILTER_NAME,
                "filter": [
                    {"function": "regex", "regex_pattern": FINAL_ANSWER_REGEX,
                     "group_select": -1},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
            }
        ],
        "metadata": {"version": 1.0},
    }


def gold_answer(answer: str) -> str:
    """The bare final answer of a row: "... The answer is 42." and "42" both give "42"."""
    return answer.split("The answer is")[-1].strip().rstrip(".").strip()


def write_local_tasks(eval_mc_path: str | Path, eval_gen_path: str | Path,
                      out_dir: str | Path) -> str:
    """Write the two task YAMLs into `out_dir` and return it (lm-eval's include_path).

    When valid_mc.jsonl / valid_gen.jsonl lie beside `eval_mc_path`, the two validation
    tasks (`lethe_synth_mc_valid`, `lethe_synth_gen_valid`) are written too."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sets = [(MC_TASK, GEN_TASK, Path(eval_mc_path), Path(eval_gen_path))]
    valid_mc, valid_gen = (Path(eval_mc_path).parent / f"valid_{k}.jsonl" for k in ("mc", "gen"))
    if valid_mc.is_file() and valid_gen.is_file():
        sets.append((MC_TASK + VALID_SUFFIX, GEN_TASK + VALID_SUFFIX, valid_mc, valid_gen))
    for mc_name, gen_name, mc_path, gen_path in sets:
        gen_rows = out / f"{gen_name}.jsonl"
        with gen_path.open() as src, gen_rows.open("w") as dst:
            for line in src:
                if line.strip():
                    row = json.loads(line)
                    dst.write(json.dumps({**row, GOLD_FIELD: gold_answer(str(row["answer"]))}) + "\n")
        for name, cfg in ((mc_name, mc_task_config(mc_path, mc_name)),
                          (gen_name, gen_task_config(gen_rows, gen_name))):
            with (out / f"{name}.yaml").open("w") as fh:
                yaml.safe_dump(cfg, fh, sort_keys=False, allow_unicode=True, width=1000)
    return str(out)
