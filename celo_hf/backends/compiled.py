"""The eager kernels through ``torch.compile`` (``backend="compile"``): same source, fused.

Passes 1 and 2 run in their unrolled form (one reduction per channel, the MLP as explicit
multiply-adds), which inductor turns into one loop each with every intermediate inlined (no
full-size buffers); pass 0 is compiled as it is. Compiled once per process, on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..layout import Kernels, RuleConfig, RuleConstants, UpdateWeights
from . import eager

#: Inductor settings for the compiled kernels: inline every intermediate (the MLP's hidden units
#: included) into the loop that consumes it instead of writing it to a full-size buffer, which cost
#: 16 bytes per parameter of extra memory and as much traffic.
_FUSE_EVERYTHING = {
    "realize_reads_threshold": 1000, "realize_cpu_opcount_threshold": 100_000, "realize_cpu_acc_reads_threshold": 1000,
}


def prepare(config: RuleConfig) -> None:
    """Nothing to do ahead: compilation happens on the first call of each kernel."""


def kernels(weights: UpdateWeights) -> Kernels:
    """The compiled kernels for the rule's constants (one set per process and rule; inductor
    specialises them per configuration)."""
    return _compiled(weights.config.constants)


def _without_view_bases(kernel: Callable[..., torch.Tensor | None], **keywords: object) -> Callable[..., torch.Tensor | None]:
    """Call ``kernel`` with every tensor argument ``detach()``-ed: same storage (in-place writes
    still land), but no view ``_base``, so ``torch.compile`` does not re-specialise on the layout of
    whatever tensor a chunk was sliced from. ``keywords`` are passed as they are."""

    def plain(x: object) -> object:
        if isinstance(x, torch.Tensor):
            return x.detach()
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # the contract's named structures
            return type(x)(*(plain(item) for item in x))
        if isinstance(x, (tuple, list)):
            return type(x)(plain(item) for item in x)
        return x

    return lambda *args: kernel(*(plain(a) for a in args), **keywords)


@functools.cache
def _compiled(constants: RuleConstants) -> Kernels:
    # The eager functions themselves are compiled, their options passed per call: a functools.partial
    # would reach dynamo through one wrapper frame shared by all three kernels, whose cache then
    # holds every kernel's entries, all checked on each call (+5% instructions per step on small models).
    def compiled(kernel: Callable[..., torch.Tensor | None], **keywords: object) -> Callable[..., torch.Tensor | None]:
        return _without_view_bases(torch.compile(kernel, dynamic=True, options=_FUSE_EVERYTHING), **keywords)

    return Kernels(
        square_sums=compiled(eager.square_sums, constants=constants),
        factored_statistics=None,
        accumulate_=compiled(eager.accumulate_, unrolled=True, constants=constants),
        mlp_step_=compiled(eager.mlp_step_, unrolled=True, constants=constants),
    )
