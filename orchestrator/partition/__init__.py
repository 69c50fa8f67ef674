"""Partition stage: global / per-sample token classes from scores (in memory or Ray Data)."""

from orchestrator.partition.stage import OUTPUT_FILE, run_partition

__all__ = ["OUTPUT_FILE", "run_partition"]
