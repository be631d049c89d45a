"""The backends: interchangeable implementations of the per-element work, behind one registry.

Each entry of :data:`REGISTRY` names a module (imported on first use) and says which devices it
updates and how many elements it takes per chunk by default. A *kernel* backend's module has
``prepare(config)`` (build or check what it needs; raises ``RuntimeError``/``OSError`` if it cannot)
and ``kernels(weights) -> layout.Kernels``; the per-tensor backend ``"reference"`` has ``prepare``
and ``update_tensor_(p, g, state, lr_scale, w)``. Backend modules import only :mod:`celo_hf.layout`
(and the ``eager`` source where they reuse it: ``compiled`` compiles it, ``cpp`` and ``triton_kernels``
take its pass 0).
:func:`auto` is the one rule behind ``backend="auto"``.

Adding a backend: one module with ``prepare`` and ``kernels`` plus one :class:`Backend` entry here.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from ..layout import Kernels, RuleConfig, UpdateWeights


@dataclass(frozen=True)
class Backend:
    """One registered implementation.

    ``module``: its module under ``celo_hf`` (imported on first use: Triton and the C++ build are
    optional); ``devices``: the device types it updates (empty: any); ``chunk_elements``: its
    default chunk size (bounds temporary memory); ``per_tensor``: it updates one tensor at a time
    (``update_tensor_``) instead of providing kernels, and cannot take sharded tensors.
    """

    name: str
    module: str
    devices: tuple[str, ...]
    chunk_elements: int
    per_tensor: bool = False

    def load(self) -> ModuleType:
        return _module(self.module)

    def prepare(self, config: RuleConfig) -> None:
        """Build (or check) what the backend needs for ``config`` now rather than in the first step."""
        self.load().prepare(config)

    def runs_on(self, device: torch.device) -> bool:
        return not self.devices or device.type in self.devices

    def kernels(self, weights: UpdateWeights) -> Kernels:
        """The backend's kernels for ``weights`` (on a device it updates)."""
        device = weights.first.device
        if not self.runs_on(device):
            others = [f"'{b.name}'" for b in REGISTRY.values() if b.runs_on(device)]
            raise ValueError(
                f"backend={self.name!r} updates {' or '.join(self.devices)} tensors, got parameters on {device}; "
                f"use backend='auto' or one of {', '.join(others)} for them"
            )
        return self.load().kernels(weights)


@functools.cache
def _module(name: str) -> ModuleType:
    return importlib.import_module(f"celo_hf.{name}")


#: Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernels are defined) runs them on CPU tensors.
_TRITON_DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)

REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("eager", "backends.eager", devices=(), chunk_elements=1 << 16),
        Backend("compile", "backends.compiled", devices=(), chunk_elements=1 << 22),
        Backend("triton", "backends.triton_kernels", devices=_TRITON_DEVICES, chunk_elements=1 << 20),
        Backend("cpp", "backends.cpp", devices=("cpu",), chunk_elements=1 << 22),
        Backend("reference", "reference", devices=(), chunk_elements=1 << 16, per_tensor=True),
    )
}
#: The names ``Celo(backend=...)`` takes: ``"auto"`` and every registered backend.
NAMES = ("auto", *REGISTRY)
#: ``"auto"``'s preferences per device type, fastest first; the last one always works.
AUTO_PREFERENCES = {"cpu": ("cpp", "eager")}
AUTO_FALLBACK = "eager"


def get(name: str) -> Backend:
    """The registered backend ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}") from None


def auto(device: torch.device, config: RuleConfig) -> tuple[str, list[str]]:
    """What ``backend="auto"`` runs on ``device`` for ``config``: the first preference that prepares
    (the C++ kernels on CPU, if they build here), else eager. Returns its name and, for each
    preference passed over, why."""
    passed_over = []
    for name in AUTO_PREFERENCES.get(device.type, ()):
        try:
            REGISTRY[name].prepare(config)
            return name, passed_over
        except (RuntimeError, OSError) as err:  # no compiler, a failed build, an unwritable cache
            passed_over.append(f"{name}: {err or type(err).__name__}")
    return AUTO_FALLBACK, passed_over
