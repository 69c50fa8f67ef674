"""Data layer: load -> chat format -> tokens + response mask; rejects; synthetic corpus."""

from orchestrator.data.chat_format import format_prompt
from orchestrator.data.errors import DataError
from orchestrator.data.loading import corpus_texts
from orchestrator.data.prepare import DataReport, prepare_dataset, read_tokens
from orchestrator.data.synthetic import SyntheticPaths, extract_answer, generate_synthetic

__all__ = [
    "DataError",
    "DataReport",
    "SyntheticPaths",
    "corpus_texts",
    "extract_answer",
    "format_prompt",
    "generate_synthetic",
    "prepare_dataset",
    "read_tokens",
]
