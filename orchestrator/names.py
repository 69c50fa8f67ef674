"""Every closed set of names Lethe uses, declared once as a `Literal`.

The config schema validates against these types; code that needs the values as a tuple
(argument choices, error messages, checks outside pydantic) derives them with
`typing.get_args`, so adding a name is one edit here. Plain `typing` only: the method core
(`orchestrator.method`, no pydantic) may import it too.
"""

from __future__ import annotations

from typing import Literal, get_args

Family = Literal["llama", "qwen2", "gpt_neo"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
# The fine-tuning objectives (paper, Sec. 3): plain SFT on every response token, SFT on the
# positive tokens only, and positives learned while negatives are forgotten.
Method = Literal["sft", "ignore", "forget"]
# How the forgetting weight lambda moves over the update steps (method/schedules.py).
Schedule = Literal["linear", "constant", "cosine"]
# The term applied to negative tokens: gradient ascent on their CE (the paper) or
# unlikelihood, -log(1 - p) (method/objective.py).
NegativeTerm = Literal["ascent", "unlikelihood"]
# What the positive / negative means divide by: this micro-batch's counts, or the counts
# over the whole optimizer step on every rank (method/objective.py).
Normalization = Literal["global", "micro_batch"]
NoiseKind = Literal["wrong_value", "filler", "typo"]
SyntheticTask = Literal["arithmetic", "world_facts", "list_ops", "string_ops", "capitals",
                        "unit_conversions", "known_arithmetic"]
# The embedded default's tasks (facts learned from the corpus); the other three ask facts a
# pretrained base already knows (knowledge-conflict noise, data/synthetic_knowledge.py).
DEFAULT_SYNTHETIC_TASKS: tuple[str, ...] = ("arithmetic", "world_facts", "list_ops", "string_ops")
# How Ray places a training run's workers (ScalingConfig.placement_strategy).
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
# Where `lethe run --until` may stop, in pipeline order.
Until = Literal["data", "reference", "score", "partition", "train", "evaluate"]

FAMILIES: tuple[str, ...] = get_args(Family)
METHODS: tuple[str, ...] = get_args(Method)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
NEGATIVE_TERMS: tuple[str, ...] = get_args(NegativeTerm)
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
NOISE_KINDS: tuple[str, ...] = get_args(NoiseKind)
SYNTHETIC_TASKS: tuple[str, ...] = get_args(SyntheticTask)
UNTIL: tuple[str, ...] = get_args(Until)
PLACEMENT_STRATEGIES: tuple[str, ...] = get_args(PlacementStrategy)
