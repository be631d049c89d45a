"""Celo2's rule: its constants and configuration, the one place that states them.

Celo2 (``docs/celo2-algorithm.md`` §6-§11) reuses Celo's state layout and feature groups
(:mod:`celo_hf.layout`: the same 14 groups in the same order, the same accumulators and
:func:`~celo_hf.layout.factored_dims`) with its own constants, listed here; the constants that differ
from Celo's are marked. Tensors of rank < 2 feed only the first :data:`VECTOR_GROUPS` groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layout import FEATURE_GROUP_NAMES, feature_group_widths

#: Gradients are clipped element-wise to +-GRAD_CLIP on the learned branch (the Adam branch sees them raw).
GRAD_CLIP = 1000.0
#: The clipped-gradient feature clips again, to +-FEATURE_GRAD_CLIP.
FEATURE_GRAD_CLIP = 0.1
#: ``rsqrt(rms + RMS_EPS)`` (Celo: 1e-6).
RMS_EPS = 1e-8
#: Added to ``g^2`` before the factored moments average it.
FACTORED_EPS = 1e-30
#: Floor of the factored preconditioner's statistics (and of the row mean's denominator).
FACTOR_FLOOR = 1e-9
#: ``rsqrt(row + ROW_COL_EPS)``, ``rsqrt(col + ROW_COL_EPS)`` features.
ROW_COL_EPS = 1e-8
#: Features and the step are divided by ``sqrt(NORMALISER_EPS + mean square over the last two axes)``
#: (Celo: 1e-5, over all axes).
NORMALISER_EPS = 1e-9

#: Newton-Schulz: the quintic's coefficients (Muon's), its iterations, and the Frobenius norm's epsilon.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5
NEWTON_SCHULZ_EPS = 1e-8

#: The Adam branch (no bias correction; the epsilon is inside the square root).
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.95
ADAM_EPS = 1e-8

#: Tensors of rank < 2 feed only these groups (``grad`` ... ``grad_over_rms``: 15 channels for 3
#: decays); the factored row / column groups exist for rank >= 2 only.
VECTOR_GROUPS = FEATURE_GROUP_NAMES[:9]


@dataclass(frozen=True)
class Celo2Config:
    """The decays a Celo2 meta-model was trained with (``Celo2Net``'s)."""

    momentum_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    rms_decay: float = 0.95
    factored_decays: tuple[float, ...] = (0.9, 0.99, 0.999)

    @property
    def num_decays(self) -> int:
        return len(self.momentum_decays)

    def num_features(self, rank: int) -> int:
        """The first layer's inputs for a tensor of ``rank``: 30 (rank >= 2) or 15 with 3 decays."""
        widths = feature_group_widths(self.num_decays)
        return sum(widths) if rank >= 2 else sum(widths[: len(VECTOR_GROUPS)])
