"""Hand-written C++ versions of the per-element kernels of :mod:`celo_hf.update` (``backend="cpp"``).

Same contracts and maths as :func:`celo_hf.update.factored_square_sums`,
:func:`~celo_hf.update.accumulate_and_square_sums_` and :func:`~celo_hf.update.mlp_step_`, and the
preparation of a matrix batch's factored moments (:class:`FactoredMomentsInCpp`). The
source (``cpu_kernels.cpp``) writes each pass as one loop over a chunk's elements in SIMD registers
(AVX-512, AVX or plain 128-bit vectors, whichever the compiling machine has): every element is read
once per pass and nothing of full size is allocated. A matrix's row and column factors stay factors.
Passes 1 and 2 split large tensors into fixed blocks of rows over ``torch.get_num_threads()``
threads; the blocks' partial sums are added in block order, so results do not depend on the number
of threads.

The library is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``; ``torch.compile`` on CPU needs one too), for this machine's CPU and the
meta-model's configuration (number of decays, hidden width, hidden layers), and cached under
``$CELO_HF_KERNEL_CACHE`` (default ``~/.cache/celo_hf/kernels``), keyed by the source, the flags,
the compiler and the CPU. Float32 tensors are used in place; other dtypes (bfloat16 parameters or
moments) go through float32 copies of each chunk, rounded back by torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import update
from .network import CeloNet
from .update import Factors, Kernels

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-pthread")

_Pointer = ctypes.c_void_p
_I64 = ctypes.c_int64
_F32 = ctypes.c_float
_GRID = [_I64, _I64, _I64]  # batch, rows, cols
_FACTORS = [_Pointer] * 4  # qg_row, qg_col, qm_row, qm_col
_SIGNATURES = {
    "celo_config": ([ctypes.POINTER(ctypes.c_int)] * 3, ctypes.c_int),
    "celo_square_sums": ([*_GRID, _Pointer, _I64, _I64, _Pointer, _Pointer], None),
    "celo_accumulate": ([*_GRID, *[_Pointer] * 5, *_FACTORS, _Pointer, _F32, _F32, _Pointer, ctypes.c_int], None),
    "celo_mlp_step": ([*_GRID, *[_Pointer] * 5, *_FACTORS, *[_Pointer] * 7, _F32, _Pointer, ctypes.c_int], None),
    "celo_factored_moments": (
        [*_GRID, _I64, _Pointer, _I64, _I64, _Pointer, _Pointer, _Pointer, _Pointer, _I64, _Pointer, _Pointer, _I64,
         *[_Pointer] * 4],
        None,
    ),
}


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    configured = os.environ.get("CELO_HF_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "celo_hf" / "kernels"


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError(
        "backend='cpp' compiles its kernels on first use and needs a C++ compiler, but none was found "
        "(looked for $CXX, c++, g++, clang++); install one (e.g. g++) or use backend='eager'"
    )


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


@functools.cache
def library(decays: int, hidden: int, hidden_layers: int) -> ctypes.CDLL:
    """The compiled kernels for a meta-model with ``decays`` decays, ``hidden`` units per hidden
    layer and ``hidden_layers`` hidden layers after the first (built on first use, then cached)."""
    compiler = _compiler()
    defines = (f"-DCELO_K={decays}", f"-DCELO_H={hidden}", f"-DCELO_L={hidden_layers}")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), *FLAGS, *defines, compiler, version, _cpu_identity()]).encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"celo_k{decays}_h{hidden}_l{hidden_layers}_{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            built = Path(scratch) / path.name
            command = [compiler, *FLAGS, *defines, str(SOURCE), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"compiling the cpp kernels failed ({' '.join(command)}):\n{result.stderr}")
            os.replace(built, path)  # atomic: concurrent builders (several processes) all succeed
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    configuration = [ctypes.c_int() for _ in range(3)]
    lib.celo_config(*(ctypes.byref(v) for v in configuration))
    if [v.value for v in configuration] != [decays, hidden, hidden_layers]:
        raise RuntimeError(
            f"{path} was built for {[v.value for v in configuration]}, not {[decays, hidden, hidden_layers]}"
        )
    return lib


def prepare(net: CeloNet) -> None:
    """Build (or load) the library for ``net``'s configuration now, so that a missing compiler
    shows when the optimizer is created rather than in its first step."""
    layers = net.mlp_layers()
    library(len(net.momentum_decays), layers[0][0].shape[0], len(layers) - 2)


def kernels(weights: update.UpdateWeights) -> Kernels:
    """The C++ kernels for ``weights``' configuration (compiled on first use)."""
    if weights.first.device.type != "cpu":
        raise ValueError(
            f"backend='cpp' updates CPU tensors, got parameters on {weights.first.device}; "
            "use backend='auto', 'eager' or 'triton' for them"
        )
    return _kernels(weights.momentum_decays.numel(), weights.first.shape[2], len(weights.hidden_layers))


@functools.cache
def _kernels(decays: int, hidden: int, hidden_layers: int) -> Kernels:
    lib = library(decays, hidden, hidden_layers)
    return Kernels(
        functools.partial(factored_moments, lib),
        functools.partial(accumulate_and_square_sums_, lib),
        functools.partial(mlp_step_, lib),
    )


# ---- arguments ------------------------------------------------------------------------------------


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernels can use it in place (float32, unit stride along rows), else a
    float32 copy."""
    return t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous()


def _in_place(kernel: Callable[..., None], outputs: Sequence[torch.Tensor], *args: object) -> None:
    """Run ``kernel`` on float32 stand-ins of ``outputs`` (followed by ``args``) and copy back any
    that were copies."""
    working = [_float32(t) for t in outputs]
    kernel(*working, *args)
    for target, result in zip(outputs, working):
        if result is not target:
            target.copy_(result)


def _strides(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor) -> ctypes.Array:
    values = (p.stride(0), p.stride(1), g.stride(0), g.stride(1), m.stride(0), m.stride(1), m.stride(2),
              rms.stride(0), rms.stride(1))
    return (_I64 * len(values))(*values)


def _row_and_column(
    parts: Factors, combine: Callable[[Sequence[torch.Tensor]], torch.Tensor], identity: float,
    batch: int, width: int, rows: int, cols: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split factors (or terms) broadcastable to ``(B, width, rows, cols)`` into a contiguous row part
    ``(B, width, rows)`` and column part ``(B, width, cols)``, each ``combine``-d; a missing part is
    ``identity``."""
    row_parts = [t for t in parts if t.shape[-1] == 1]
    col_parts = [t for t in parts if t.shape[-1] != 1]
    if any(t.shape[-2] != 1 for t in col_parts):
        raise ValueError(f"the cpp kernels take row and column factors, got shapes {[tuple(t.shape) for t in parts]}")

    def part(terms: list[torch.Tensor], shape: tuple[int, ...], size: int) -> torch.Tensor:
        if not terms:
            return torch.full((batch, width, size), identity, dtype=torch.float32)
        return combine(terms).float().expand(batch, width, *shape).reshape(batch, width, size).contiguous()

    return part(row_parts, (rows, 1), rows), part(col_parts, (1, cols), cols)


def _factor_pointers(q_g: Factors, q_m: Factors, m: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """The preconditioners' row and column parts, and their addresses (keep the tensors alive). A
    preconditioner shared by the gradient and the momentum is passed once, twice."""
    batch, decays, rows, cols = m.shape
    split = lambda q: _row_and_column(q, update._product, 1.0, batch, decays, rows, cols)  # noqa: E731
    parts = [*split(q_g), *(split(q_m) if q_m is not q_g else ())]
    pointers = [_ptr(t) for t in parts]
    return parts, pointers if len(pointers) == 4 else pointers * 2


# ---- the kernels ----------------------------------------------------------------------------------


def factored_square_sums(lib: ctypes.CDLL, g: torch.Tensor, d0: int, d1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 0 (contract of :func:`celo_hf.update.factored_square_sums`); matrices in C++, higher
    ranks through the eager kernel."""
    if g.dim() != 3:
        return update.factored_square_sums(g, d0, d1)
    g = _float32(g)
    batch, rows, cols = g.shape
    row_sums = torch.empty(batch, rows, dtype=torch.float32)
    col_sums = torch.empty(batch, cols, dtype=torch.float32)
    lib.celo_square_sums(batch, rows, cols, _ptr(g), g.stride(0), g.stride(1), _ptr(row_sums), _ptr(col_sums))
    by_axis = {0: col_sums, 1: row_sums}  # summed over matrix axis 0 (down columns) or axis 1 (along rows)
    return by_axis[d0], by_axis[d1]


def accumulate_and_square_sums_(
    lib: ctypes.CDLL, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor, q_g: Factors,
    q_m: Factors, momentum_decays: torch.Tensor, rms_decay: float,
) -> torch.Tensor:
    """Pass 1 (contract of :func:`celo_hf.update.accumulate_and_square_sums_`)."""
    batch, rows, cols = p.shape
    sums = torch.zeros(batch, 6 + 4 * m.shape[1], dtype=torch.float64)  # the kernels' channels
    keep_alive, factors = _factor_pointers(q_g, q_m, m)  # noqa: F841 (the pointers point into them)
    p, g = _float32(p), _float32(g)
    decays = momentum_decays.float().contiguous()

    def run(m32: torch.Tensor, rms32: torch.Tensor) -> None:
        lib.celo_accumulate(
            batch, rows, cols, _ptr(p), _ptr(g), _ptr(m32), _ptr(rms32), _strides(p, g, m32, rms32), *factors,
            _ptr(decays), rms_decay, 1 - rms_decay, _ptr(sums), torch.get_num_threads(),
        )

    _in_place(run, (m, rms))
    return sums.float()


def mlp_step_(
    lib: ctypes.CDLL, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor, q_g: Factors,
    q_m: Factors, hidden_in: Factors, first: torch.Tensor, hidden_layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    last: tuple[torch.Tensor, torch.Tensor], exp_mult: float, step_scale: torch.Tensor,
) -> None:
    """Pass 2 (contract of :func:`celo_hf.update.mlp_step_`)."""
    batch, rows, cols = p.shape
    width = first.shape[2]
    keep_alive, factors = _factor_pointers(q_g, q_m, m)  # noqa: F841 (the pointers point into them)
    hidden = _row_and_column(hidden_in, update._total, 0.0, batch, width, rows, cols)
    g, m, rms = _float32(g), _float32(m), _float32(rms)
    if hidden_layers:
        hidden_w = torch.stack([w for w, _ in hidden_layers], 1).float().contiguous()
        hidden_b = torch.stack([b for _, b in hidden_layers], 1).float().contiguous()
    else:
        hidden_w = hidden_b = torch.zeros(1)
    dense = [t.float().contiguous() for t in (first, hidden_w, hidden_b, *last, step_scale)]

    def run(p32: torch.Tensor) -> None:
        lib.celo_mlp_step(
            batch, rows, cols, _ptr(p32), _ptr(g), _ptr(m), _ptr(rms), _strides(p32, g, m, rms), *factors,
            *(_ptr(t) for t in hidden), *(_ptr(t) for t in dense[:5]), exp_mult, _ptr(dense[5]), torch.get_num_threads(),
        )

    _in_place(run, (p,))


# ---- factored moments ------------------------------------------------------------------------------


class FactoredMomentsInCpp(update._FactoredMoments):
    """:class:`celo_hf.update._FactoredMoments` of a float32 matrix batch that one process holds
    whole, prepared by one C++ call (pass 0, the moving averages, the preconditioner's factors and
    the row / column features' first-layer input) instead of some fifty small torch operations."""

    def __init__(self, lib: ctypes.CDLL, g: torch.Tensor, state: update.TensorState, w: update.UpdateWeights, d0: int):
        batch, rows, cols = g.shape
        decays, width = w.factored_decays.numel(), w.first.shape[2]
        q_rows, q_cols = torch.empty(batch, decays, rows), torch.empty(batch, decays, cols)
        h_rows, h_cols = torch.empty(batch, width, rows), torch.empty(batch, width, cols)
        along = (cols, rows) if d0 == 0 else (rows, cols)  # v_row's and v_col's lengths
        for key, length in zip(("v_row", "v_col"), along):
            if state[key].shape != (batch, decays, length):
                raise ValueError(f"{key} of shape {tuple(state[key].shape)} does not fit gradients {tuple(g.shape)} "
                                 f"factored with d0={d0}: expected {(batch, decays, length)}")
        groups = [w.group_slices[i].start for i in (update._ROW, update._COL, update._RSQRT_ROW, update._RSQRT_COL)]
        lib.celo_factored_moments(
            batch, rows, cols, d0, _ptr(g), g.stride(0), g.stride(1), _ptr(state["v_row"]), _ptr(state["v_col"]),
            _ptr(w.factored_decays), _ptr(w.first), w.first.stride(0), (_I64 * 4)(*groups),
            _ptr(w.first_bias), w.first_bias.stride(0), _ptr(q_rows), _ptr(q_cols), _ptr(h_rows), _ptr(h_cols),
        )
        on_rows, on_cols = (q_rows.unsqueeze(3), h_rows.unsqueeze(3)), (q_cols.unsqueeze(2), h_cols.unsqueeze(2))
        # v_row averages over axis d0, so it lies along the other axis (and v_col the other way round).
        (self.row_scale, self.row_hidden), (self.col_scale, self.col_hidden) = (
            (on_cols, on_rows) if d0 == 0 else (on_rows, on_cols)
        )
        self.batch = batch
        self.matrix = True


def _whole_float32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


def factored_moments(
    lib: ctypes.CDLL, g: torch.Tensor, state: update.TensorState, w: update.UpdateWeights, dims: tuple[int, int],
    chunks: list[slice], full: tuple[int, ...], sharding: update.RowSharding | None,
) -> update._FactoredMoments:
    """A batch's factored moments: in C++ for a float32 matrix batch held whole, else as
    :class:`celo_hf.update._FactoredMoments` computes them."""
    first_layout = w.first.stride()[1:] == (w.first.shape[2], 1) and w.first_bias.stride(-1) == 1
    if (
        sharding is None and g.dim() == 3 and g.dtype == torch.float32 and g.stride(-1) == 1 and first_layout
        and _whole_float32(state["v_row"]) and _whole_float32(state["v_col"])
        and w.factored_decays.dtype == torch.float32 and w.factored_decays.is_contiguous()
    ):
        return FactoredMomentsInCpp(lib, g, state, w, dims[0])
    square_sums = functools.partial(factored_square_sums, lib)
    return update._FactoredMoments(g, state, w, dims, chunks, full, sharding, square_sums)
