"""Celo2 (Moudgil, Knyazev, Belilovsky, ICLR 2026) and Celo2-base: the second update rule.

Modules, bottom up: :mod:`.rule` (constants), :mod:`.reference` (the literal spec, one tensor),
:mod:`.newton_schulz`, :mod:`.update` (the batched learned branch and the Adam branch),
:mod:`.routing` (branch and axis order per parameter), :mod:`.network` (``Celo2Net``, the
meta-model), :mod:`.hub` (``load_celo2_net``: ``weights=...`` to a ``Celo2Net``), :mod:`.optimizer` (``Celo2``).
"""
