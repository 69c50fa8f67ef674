"""The token score: how much the reference model lowered a token's loss below the base's.

    score(token) = CE_base(token) - CE_ref(token)

(Taheri et al., "Forgetting: A New Mechanism Towards Better Large Language Model
Fine-tuning", TMLR 2026, arXiv 2508.04329: the cross-model influence score of the method's
token-scoring step, with CE the next-token cross-entropy of the response token under the
frozen base model and under the reference model, itself fine-tuned on a subset of the
pool.) A high score means the reference learned the token from the data: the partition
(method/partition.py) keeps the top `rho` fraction as positive. Pure numpy (method core).
"""

from __future__ import annotations

import numpy as np


def token_scores(base_loss: np.ndarray, ref_loss: np.ndarray) -> np.ndarray:
    """float32 CE_base - CE_ref, elementwise (the subtraction itself in float32, as stored)."""
    base = np.asarray(base_loss)
    ref = np.asarray(ref_loss)
    if base.shape != ref.shape:
        raise ValueError(f"base_loss shape {base.shape} != ref_loss shape {ref.shape}")
    return (base.astype(np.float32) - ref.astype(np.float32)).astype(np.float32)
