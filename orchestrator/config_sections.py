"""The data, reference, scoring, partition and training sections of the experiment config.

Split from config.py to keep files small; import them from orchestrator.config. Every
field carries its docstring (pydantic's `use_attribute_docstrings`: it becomes the field's
description), as TRL's `SFTConfig` documents each argument. "Paper" means Taheri et al.,
"Forgetting: A New Mechanism Towards Better Large Language Model Fine-tuning", TMLR 2026,
arXiv 2508.04329.
"""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.config_models import DType, Method, Strict
from orchestrator.names import (
    DEFAULT_SYNTHETIC_TASKS,
    METHODS,
    NOISE_KINDS,
    NegativeTerm,
    NoiseKind,
    Normalization,
    PlacementStrategy,
    Schedule,
    SyntheticTask,
)


class SyntheticConfig(Strict):
    """The embedded noisy SFT corpus (orchestrator/data/synthetic.py)."""

    num_train: int = Field(default=2000, ge=1)
    """Training conversations generated."""
    num_eval: int = Field(default=200, ge=1)
    """Held-out questions per evaluation task (multiple choice and generation)."""
    num_valid: int = Field(default=0, ge=0)
    """Validation questions per task (valid_mc / valid_gen files, lm-eval tasks
    lethe_synth_mc_valid / lethe_synth_gen_valid), disjoint from the test questions and from
    training: what a sweep selects on, so the test set stays untouched. 0 = none."""
    noise_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    """Share of training responses corrupted (their noisy tokens are recorded)."""
    noise_kinds: list[NoiseKind] = list(NOISE_KINDS)
    """Kinds of corruption drawn from: wrong values, filler words, typos."""
    tasks: list[SyntheticTask] = list(DEFAULT_SYNTHETIC_TASKS)
    """Checkable task families the conversations are drawn from. capitals, unit_conversions
    and known_arithmetic ask facts the base model already knows (its greedy answers,
    orchestrator/data/known_facts.json): their wrong values are knowledge-conflict noise."""
    seed: int = 0
    """Seed of the generator: the same seed gives the same corpus."""


class ColumnsConfig(Strict):
    """Column names of the source rows where they differ from the layout's own (as
    LLaMA-Factory's dataset_info `columns` and `tags`); orchestrator/data/row_formats.py."""

    messages: str = Field(default="messages", min_length=1)
    """The message list of a `messages` row."""
    conversations: str = Field(default="conversations", min_length=1)
    """The turn list of a `sharegpt` row."""
    role: str | None = Field(default=None, min_length=1)
    """A message's role key; None = the layout's own (role; sharegpt: from)."""
    content: str | None = Field(default=None, min_length=1)
    """A message's text key; None = the layout's own (content; sharegpt: value)."""
    system: str = Field(default="system", min_length=1)
    """The top-level system prompt of `sharegpt` and `alpaca` rows."""
    prompt: str = Field(default="prompt", min_length=1)
    """The prompt of a `prompt_completion` row."""
    completion: str = Field(default="completion", min_length=1)
    """The completion of a `prompt_completion` row."""
    instruction: str = Field(default="instruction", min_length=1)
    """The instruction of an `alpaca` row."""
    input: str = Field(default="input", min_length=1)
    """The optional input of an `alpaca` row (appended to the instruction)."""
    output: str = Field(default="output", min_length=1)
    """The response of an `alpaca` row."""
    history: str = Field(default="history", min_length=1)
    """The optional earlier [question, answer] pairs of an `alpaca` row."""


class DataConfig(Strict):
    """Where the training rows come from and how they become tokens."""

    source: Literal["synthetic", "file", "hf"] = "synthetic"
    """synthetic: the embedded corpus; file: a local file; hf: a `datasets` name / folder."""
    path: str | None = None
    """jsonl / json / parquet file, or a datasets name / directory (not for synthetic)."""
    split: str = "train"
    """The dataset split to read (hf sources)."""
    revision: str | None = Field(default=None, max_length=255,
                                 pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    """Hub revision of a `datasets` name (source hf): a branch, tag or 40-hex commit; None =
    the default branch. Resolved to its commit on first use and recorded in the run
    directory (stage "dataset"), so later runs load that commit even after the branch moves.
    Not for local files or folders, which are keyed by their content."""
    data_files: str | None = Field(default=None, min_length=1, max_length=1000)
    """One data file (or glob) inside the hub dataset's repository to read, instead of the
    dataset's own layout, e.g. `tulu_50k_sample.json` (the paper's released sample in
    `Aligh1380/forgetting-llm-dataset`); read at `revision` like the rest, as the split
    `train` (datasets' rule for data files given alone). Source hf only; None = the dataset
    as its card or layout defines it."""
    format: Literal["auto", "messages", "prompt_completion", "sharegpt", "alpaca"] = "auto"
    """Row layout (README "Your data"): chat `messages`, `prompt` / `completion`, ShareGPT
    `conversations`, Alpaca `instruction` / `input` / `output`; auto = found per row from
    its keys."""
    columns: ColumnsConfig | None = None
    """Column names where the rows' differ from the layout's own, e.g. {messages: dialogue,
    role: speaker, content: text} or {instruction: question, output: answer}."""
    roles: dict[str, str] | None = None
    """Role names of the rows -> system / user / assistant, added to those known (system,
    user, assistant, and ShareGPT's human, gpt), e.g. {bot: assistant, narrator: system}."""
    chat_template: Literal["paper", "tokenizer"] = "paper"
    """paper: the open-instruct / Tulu template the authors trained with; tokenizer: the
    tokenizer's own chat template."""
    max_seq_len: int = Field(default=512, ge=8)
    """Tokens per sample after chat formatting; longer samples are truncated."""
    max_rejected_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    """Rows that cannot be used (empty, malformed, no response) above this share fail the run."""
    limit: int | None = Field(default=None, ge=1)
    """A seeded random sample of this many source rows (orchestrator/data/sampling.py), never
    the first N: sources such as the Tulu mixture are stored grouped by origin."""
    limit_seed: int = 0
    """Seed of the `limit` sample (and of the validation split)."""
    stratify_by: str | None = None
    """Draw the sample (and train.validation_size) proportionally to this column's values."""
    max_row_chars: int | None = Field(default=1_000_000, ge=1)
    """A row (a JSONL line, or a row's message text) longer than this is rejected before it
    is parsed or tokenized: one runaway row must not exhaust memory. None = no bound."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """The embedded corpus (source: synthetic)."""

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: dict[str, str] | None) -> dict[str, str] | None:
        allowed = ("system", "user", "assistant")
        for name, role in (roles or {}).items():
            if role not in allowed:
                close = difflib.get_close_matches(str(role), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"{name}: {role!r} is not a role{hint}; allowed: "
                                 f"{', '.join(allowed)}")
        return roles

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        if self.revision is not None and ".." in self.revision:  # a git ref never holds ".."
            raise ValueError(f"data.revision={self.revision!r}: not a branch, tag or commit name")
        if self.revision is not None and self.source != "hf":
            raise ValueError(f"data.revision={self.revision!r} applies to data.source 'hf' (a "
                             f"hub dataset), not '{self.source}': local data is keyed by content")
        if self.data_files is not None:
            if self.source != "hf":
                raise ValueError(f"data.data_files={self.data_files!r} names a file inside a hub "
                                 f"dataset (data.source 'hf'); for a local file set data.path "
                                 "to it")
            if ".." in self.data_files.split("/") or self.data_files.startswith("/"):
                raise ValueError(f"data.data_files={self.data_files!r}: a path inside the "
                                 "dataset's repository (no '..', not absolute)")
        return self


class LoraConfig(Strict):
    """LoRA adapters (peft); absent = full fine-tuning."""

    r: int = Field(default=64, ge=1)
    """Adapter rank."""
    alpha: int = Field(default=16, ge=1)
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or every linear layer but the output head."""


class ReferenceConfig(Strict):
    """The reference model: the base fine-tuned with plain SFT on a subset of the pool."""

    subset_fraction: float | None = Field(default=0.2, gt=0.0, le=1.0)
    """Share of the training pool the reference trains on."""
    subset_size: int | None = Field(default=None, ge=1)
    """Rows the reference trains on; wins over subset_fraction."""
    subset_source: Literal["random", "clean"] = "random"
    """random: the paper's random subset of the pool. clean: the same number of rows drawn
    from the pool's rows without annotated noise (a trusted clean subset, as Token Cleaning
    assumes; needs noise annotations, see orchestrator/data/trusted.py)."""
    seed: int = 0
    """Seed of the subset draw and of the reference's training."""
    lr: float | None = None
    """Learning rate; None = train.lr."""
    epochs: float | None = None
    """Epochs over the subset; None = train.epochs."""
    lora: LoraConfig | None = None
    """Adapters for the reference; None = train.lora."""


class ScoringConfig(Strict):
    """Per-token losses of base and reference on every response token (Ray actors)."""

    num_actors: int = Field(default=1, ge=1)
    """Most scoring actors at once (each holds both models): the cap of Ray Data's actor
    pool. All are asked for at start; those the cluster has no room for yet wait in Ray's
    queue (an autoscaler sees them) and join when room appears."""
    min_actors: int = Field(default=1, ge=1)
    """Fewest scoring actors: the pool shrinks to this when actors idle (capped by
    num_actors)."""
    num_gpus_per_actor: float = Field(default=0.0, ge=0.0)
    """GPUs reserved per actor (0 = CPU)."""
    num_cpus_per_actor: float = Field(default=1.0, gt=0.0)
    """CPUs reserved per actor."""
    scheduling_strategy: Literal["SPREAD", "DEFAULT"] = "SPREAD"
    """How Ray places the actors: SPREAD (one per node where it can: a node's failure loses
    one actor's blocks) or DEFAULT (where Ray prefers)."""
    batch_size: int = Field(default=256, ge=1)
    """Rows per scoring call inside a block."""
    token_budget: int = Field(default=16384, ge=64)
    """Padded tokens per forward pass (rows are bucketed by length to fill it)."""
    chunk_size: int = Field(default=4096, ge=16)
    """Rows per cross-entropy chunk (bounds the logits held at once)."""
    dtype: DType = "auto"
    """Model dtype; auto = bfloat16 on a GPU that supports it, float32 on CPU."""
    packing: bool = False
    """Must stay false: packing is not implemented (see the check below)."""

    @field_validator("packing")
    @classmethod
    def _packing_not_implemented(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "scoring.packing: true is not implemented. Packing pays only with a varlen "
                "attention kernel (flash-attn); with sdpa the block-diagonal mask is slower "
                "than the length-bucketed padded batches Lethe uses (79.4 k vs 128.6 k "
                "tokens/s on one H100, docs/GPU.md). Remove the key or set it to false.")
        return value


class PartitionConfig(Strict):
    """Splitting the scored tokens into positive and negative (method/partition.py)."""

    rho: float = Field(default=0.7, ge=0.0, le=1.0)
    """Share of response tokens that are positive (the highest scores); the rest are negative."""
    mode: Literal["global", "per_sample"] = "global"
    """global: one threshold over the whole corpus (the paper); per_sample: rho within each sample."""
    histogram_bins: int = Field(default=100, ge=2)
    """Bins of the score histogram in the partition report."""


class LambdaConfig(Strict):
    """The forgetting weight lambda over the update steps (method/schedules.py)."""

    schedule: Schedule = "linear"
    """linear: the paper's ramp from 0 to t_max; constant: t_max; cosine: t_min to t_max."""
    t_max: float = Field(default=0.25, ge=0.0)
    """The largest lambda (reached at the last step by the linear ramp)."""
    t_min: float = Field(default=1e-5, ge=0.0)
    """The smallest lambda (the paper's code subtracts it from t_max in the ramp)."""


class TrainConfig(Strict):
    """Fine-tuning: the objective, the optimiser and the Ray Train / DeepSpeed resources."""

    methods: list[Method] = list(METHODS)
    """Objectives trained per model: sft (every response token), ignore (positives only),
    forget (positives learned, negatives forgotten)."""
    negative_term: NegativeTerm = "ascent"
    """ascent: -lambda * mean CE of the negatives (the paper); unlikelihood: +lambda * mean
    -log(1 - p)."""
    normalization: Normalization = "global"
    """global: class means over every micro-batch and rank of the optimizer step;
    micro_batch: per micro-batch means, averaged by the engine (the paper's code)."""
    lambda_: LambdaConfig = Field(default=LambdaConfig(), alias="lambda")
    """The forgetting weight's schedule (`lambda:` in YAML)."""
    lr: float = Field(default=1e-4, gt=0.0)
    """Peak learning rate (AdamW, linear warm-up then linear decay)."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(default=0.03, ge=0.0, le=1.0)
    """Share of the update steps spent warming the learning rate up."""
    epochs: float = Field(default=1.0, gt=0.0)
    """Passes over the training rows (fractions allowed)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps; wins over epochs."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (per worker)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    """Gradient clipping norm; None = no clipping."""
    seed: int = 42
    """Training seed (data order, dropout); `seeds` at the top level runs several."""
    lora: LoraConfig | None = None
    """Adapters; None = full fine-tuning."""
    deepspeed: str | None = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON (ZeRO stage, offload); None = plain torch DDP."""
    num_workers: int = Field(default=2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker when true."""
    cpus_per_worker: float = Field(default=0.9, gt=0.0)
    """CPUs reserved per worker."""
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    """GPUs reserved per worker."""
    placement_strategy: PlacementStrategy = "PACK"
    """How Ray places the workers: PACK (as few nodes as possible) or SPREAD (one worker per
    node where it can; each node's GPUs and NICs serve one rank)."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Optimizer steps between checkpoints; 0 = only at the end."""
    checkpoint_every_minutes: float | None = Field(default=30.0, gt=0.0)
    """...and at least this often in minutes of training, so a failure never loses a whole
    run (orchestrator/training/checkpoint_policy.py); None = steps only."""
    max_failures: int = Field(default=0, ge=0)
    """Worker-group restarts Ray Train may make (each resumes from the latest checkpoint)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN / inf loss: stop naming the step, or skip that micro-batch."""
    loss_chunk_size: int = Field(default=4096, ge=16)
    """Rows per cross-entropy chunk (bounds the logits held at once)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, more compute)."""
    dtype: DType = "auto"
    """Model dtype; auto = bfloat16 on a GPU that supports it, float32 on CPU."""
    eval_every: int = Field(default=0, ge=0)
    """Optimizer steps between validation losses; 0 = at the end only."""
    validation_size: int = Field(default=0, ge=0)
    """Held-out clean samples for the validation loss; 0 = none."""
