"""Lethe: token-level forgetting for LLM fine-tuning, orchestrated on Ray."""

__version__ = "0.1.0"
