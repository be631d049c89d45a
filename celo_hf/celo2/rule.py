"""Celo2's rule: its constants and configuration, the one place that states them.

Celo2 (``docs/celo2-algorithm.md`` §6-§11) reuses Celo's state layout and feature groups
(:mod:`celo_hf.layout`: the same 14 groups in the same order, the same accumulators and
:func:`~celo_hf.layout.factored_dims`) with its own constants, listed here; the constants that differ
from Celo's are marked. Tensors of rank < 2 have no factored groups
(:data:`celo_hf.layout.VECTORLESS_GROUPS`; ``RuleConfig.vector_factored_groups`` false).
"""

from __future__ import annotations

from ..layout import RuleConstants

#: Celo2's constants: Celo's except two (the reference's ``rsqrt(rms + 1e-8)``, Celo: 1e-6; and the
#: normaliser's epsilon 1e-9, Celo: 1e-5, over the last two axes instead of the whole tensor).
CONSTANTS = RuleConstants(rms_eps=1e-8, normaliser_eps=1e-9)

#: Newton-Schulz: the quintic's coefficients (Muon's), its iterations, and the Frobenius norm's epsilon.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5
NEWTON_SCHULZ_EPS = 1e-8

#: The Adam branch (no bias correction; the epsilon is inside the square root).
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.95
ADAM_EPS = 1e-8
