"""The update rule's layout: the one place that states its constants, features and state shapes.

Everything above reads these facts from here: the literal reference (:mod:`celo_hf.reference`),
the driver (:mod:`celo_hf.driver`) and every backend (:mod:`celo_hf.backends`); the C++ kernels
receive them as compile-time defines (:func:`c_defines`) and the Triton kernels as ``tl.constexpr``
arguments (:func:`kernel_channel_offsets`). Nothing here computes an update.

* **Constants** (``docs/celo-algorithm.md`` §4, §7, §8): the gradient clips and epsilons below.
* **Features**: 14 groups (:data:`FEATURE_GROUP_NAMES`, widths :func:`feature_group_widths`), the
  first layer's input rows in that order. The kernels compute the per-element groups
  (:data:`ELEMENT_GROUPS`, their *channels* :func:`kernel_channel_offsets`); the row / column
  groups (:data:`ROW_COL_GROUPS`) come from the factored moments on their own grids.
* **State** of one tensor of shape ``S`` (scalars count as ``S = (1,)``), ``k`` decays, the decay
  axis *first* so that each decay's plane is contiguous: ``m`` ``(k, *S)`` momenta, ``rms`` ``S``
  second moment (both float32, or bfloat16 storage); for rank >= 2 ``v_row`` ``(k, *S without d0)``
  and ``v_col`` ``(k, *S without d1)`` (axes :func:`factored_dims`); for rank < 2 ``v_diag``
  ``(k, *S)``. A batch stacks these on a new axis 0.
* **Shared types**: the meta-model's configuration (:class:`RuleConfig`) and weights laid out for
  the batched update (:class:`UpdateWeights`), the row-sharding description (:class:`RowSharding`)
  and the kernels' contract (:class:`Kernels` and the named structures it passes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
import dataclasses
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .meta_model import MetaModel

# ---- constants --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleConstants:
    """An update rule's numerical constants; the defaults are Celo's (``docs/celo-algorithm.md`` §4,
    §7, §8), Celo2 changes two (:data:`celo_hf.celo2.rule.CONSTANTS`).

    ``grad_clip``: gradients are clipped to +-grad_clip before anything else; ``feature_grad_clip``:
    the clipped-gradient feature clips again; ``rms_eps``: ``rsqrt(rms + rms_eps)``; ``factored_eps``:
    added to ``g^2`` before the factored moments average it; ``factor_floor``: floor of the factored
    preconditioner's statistics (and of the row mean's denominator); ``row_col_eps``:
    ``rsqrt(row + row_col_eps)`` features; ``normaliser_eps``: each feature is divided by
    ``sqrt(normaliser_eps + its mean square)``; ``param_scale_eps``: the step is scaled by
    ``sqrt(mean(p^2) + param_scale_eps)`` (Celo only).
    """

    grad_clip: float = 1000.0
    feature_grad_clip: float = 0.1
    rms_eps: float = 1e-6
    factored_eps: float = 1e-30
    factor_floor: float = 1e-9
    row_col_eps: float = 1e-8
    normaliser_eps: float = 1e-5
    param_scale_eps: float = 1e-9

    def by_name(self) -> dict[str, float]:
        """Every constant by its upper-case name (what :func:`c_defines` passes to the C++ kernels)."""
        return {field.name.upper(): getattr(self, field.name) for field in fields(self)}


#: Celo's constants; the names below are its values, for the code that only ever runs Celo.
CELO_CONSTANTS = RuleConstants()
GRAD_CLIP = CELO_CONSTANTS.grad_clip
FEATURE_GRAD_CLIP = CELO_CONSTANTS.feature_grad_clip
RMS_EPS = CELO_CONSTANTS.rms_eps
FACTORED_EPS = CELO_CONSTANTS.factored_eps
FACTOR_FLOOR = CELO_CONSTANTS.factor_floor
ROW_COL_EPS = CELO_CONSTANTS.row_col_eps
NORMALISER_EPS = CELO_CONSTANTS.normaliser_eps
PARAM_SCALE_EPS = CELO_CONSTANTS.param_scale_eps
#: Celo's constants by name.
CONSTANTS = CELO_CONSTANTS.by_name()

# ---- features ---------------------------------------------------------------------------------------

#: The 14 per-parameter feature groups, in the order of ``docs/celo-algorithm.md`` §7 (the order of
#: the first layer's input rows).
FEATURE_GROUP_NAMES = (
    "grad", "clipped_grad", "param", "momentum", "rms", "momentum_over_rms", "rsqrt_rms",
    "factored_grad", "grad_over_rms", "row", "col", "rsqrt_row", "rsqrt_col", "factored_momentum",
)
#: Groups with one value per decay (the others have one value per element).
PER_DECAY_GROUPS = frozenset(
    {"momentum", "momentum_over_rms", "factored_grad", "row", "col", "rsqrt_row", "rsqrt_col", "factored_momentum"}
)
#: Groups the kernels compute element by element, in their channel order.
ELEMENT_GROUPS = tuple(name for name in FEATURE_GROUP_NAMES if name not in ("row", "col", "rsqrt_row", "rsqrt_col"))
#: Groups that come from the factored moments (broadcast along one axis of a matrix, or ``v_diag``).
ROW_COL_GROUPS = ("row", "col", "rsqrt_row", "rsqrt_col")
#: The groups a rule without factored groups for vectors (``RuleConfig.vector_factored_groups``
#: false: Celo2) does not feed tensors of rank < 2.
VECTORLESS_GROUPS = (*ROW_COL_GROUPS, "factored_momentum")


def feature_group_widths(num_decays: int) -> tuple[int, ...]:
    """Width of each of the 14 feature groups when there are ``num_decays`` momentum decays."""
    return tuple(num_decays if name in PER_DECAY_GROUPS else 1 for name in FEATURE_GROUP_NAMES)


@functools.cache
def group_slices(num_decays: int) -> dict[str, slice]:
    """Each feature group's rows of the first layer's input (``F = sum of the widths``); do not modify."""
    slices, start = {}, 0
    for name, width in zip(FEATURE_GROUP_NAMES, feature_group_widths(num_decays)):
        slices[name] = slice(start, start + width)
        start += width
    return slices


@functools.cache
def kernel_channel_offsets(num_decays: int) -> dict[str, int]:
    """Where each element group starts among the kernels' channels (groups :data:`ELEMENT_GROUPS`
    laid end to end), plus ``"channels"``: their total ``6 + 4 k``; do not modify."""
    offsets, start = {}, 0
    for name in ELEMENT_GROUPS:
        offsets[name] = start
        start += num_decays if name in PER_DECAY_GROUPS else 1
    offsets["channels"] = start
    return offsets


# ---- state shapes -----------------------------------------------------------------------------------


def state_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape Celo computes with: the parameter's, with scalars as ``(1,)``."""
    return tuple(shape) or (1,)


def factored_dims(shape: tuple[int, ...] | torch.Size) -> tuple[int, int] | None:
    """The axes ``(d0, d1)`` Celo's factored second moments reduce over, or ``None`` if rank < 2.

    ``d0`` is the largest axis and ``d1`` the second largest. Ties go to the *later* axis (a stable
    ascending sort of the sizes, take the last two), exactly as the reference: ``(n, n) -> (1, 0)``,
    ``(16, 1) -> (0, 1)``. Size-1 axes are factored too.
    """
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda axis: shape[axis])
    return order[-1], order[-2]


def param_scale_floor(shape: tuple[int, ...] | torch.Size, floor: float | None) -> float:
    """The least ``param_scale`` a tensor of ``shape`` steps with, under ``CeloNet(param_scale_floor=floor)``.

    Celo scales each tensor's step by its RMS ``sqrt(mean(p^2) + 1e-9)``, so a tensor initialised at
    zero (a LoRA adapter's ``B``) moves by about 1e-6 per element per step and stays near zero. With a
    ``floor`` ``c``, a tensor of rank >= 2 steps as if its RMS were at least ``c / sqrt(k)``, ``k`` its
    size over every axis but the largest (a matrix's shorter side: the rank ``r`` of a ``(d, r)``
    adapter), the RMS a ``1/sqrt(fan_in)`` initialisation would give it in either orientation.
    Returns 0.0 (no floor) for ``floor=None`` (Celo v1) and for tensors of rank < 2.
    """
    if floor is None or len(shape) < 2:
        return 0.0
    return floor / math.sqrt(numel(shape) / max(shape))


def drop_axis(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """``shape`` without ``axis``."""
    return shape[:axis] + shape[axis + 1 :]


def row_mean_axis(d0: int, d1: int) -> int:
    """Position of parameter axis ``d1`` among ``v_row``'s parameter axes (``d0`` removed)."""
    return d1 - 1 if d1 > d0 else d1


def init_tensor_state(
    shape: torch.Size | tuple[int, ...],
    num_decays: int,
    device: torch.device | str | None = None,
    full_shape: torch.Size | tuple[int, ...] | None = None,
    moment_dtype: torch.dtype = torch.float32,
) -> TensorState:
    """Zero accumulators for a parameter of ``shape`` (see the module docstring for the layout).

    ``full_shape``: the whole tensor's shape when ``shape`` is this process's rows of it (FSDP2);
    the factored axes are chosen from it. ``moment_dtype``: storage of the two per-element
    accumulators ``m`` and ``rms`` (arithmetic stays float32; bfloat16 halves their memory).
    """
    shape = state_shape(shape)
    zeros = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
    state = {
        "m": torch.zeros(num_decays, *shape, dtype=moment_dtype, device=device),
        "rms": torch.zeros(*shape, dtype=moment_dtype, device=device),
    }
    dims = factored_dims(state_shape(full_shape) if full_shape is not None else shape)
    if dims is None:
        state["v_diag"] = zeros(num_decays, *shape)
    else:
        d0, d1 = dims
        state["v_row"] = zeros(num_decays, *drop_axis(shape, d0))
        state["v_col"] = zeros(num_decays, *drop_axis(shape, d1))
    return state


def numel(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of ``shape``."""
    out = 1
    for size in shape:
        out *= size
    return out


# ---- shared types -----------------------------------------------------------------------------------

#: One tensor's (or a batch's) accumulators by name (layout in the module docstring).
TensorState = dict[str, torch.Tensor]
#: Tensors whose product (preconditioners) or sum (first-layer input) a kernel forms element by element.
Factors = tuple[torch.Tensor, ...]


def product(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise product of ``factors`` (broadcast)."""
    out = factors[0]
    for factor in factors[1:]:
        out = out * factor
    return out


def total(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise sum of ``terms`` (broadcast)."""
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


class KernelShape(NamedTuple):
    """What compiled kernels are specialised for: ``decays`` decays, ``hidden`` units per hidden
    layer, ``hidden_layers`` hidden layers after the first, and the rule's ``constants``."""

    decays: int
    hidden: int
    hidden_layers: int
    constants: RuleConstants = CELO_CONSTANTS


@dataclass(frozen=True)
class RuleConfig:
    """The configuration of the update rule a meta-model was trained with: what every layer reads
    (and what the C++ kernels are compiled for).

    ``hidden``: width of the MLP's hidden layers; ``hidden_layers``: how many follow the first;
    ``constants``: the rule's; ``vector_factored_groups``: tensors of rank < 2 feed the row / column
    groups and the factored momentum from their diagonal moment ``v_diag`` (Celo), or do not have
    those groups at all (Celo2: their first-layer rows are not used); ``param_scale_floor``: the
    least RMS a tensor's step is scaled by (:func:`param_scale_floor`; ``None``: Celo v1, none).
    """

    momentum_decays: tuple[float, ...]
    factored_decays: tuple[float, ...]
    rms_decay: float
    step_mult: float
    exp_mult: float
    hidden: int
    hidden_layers: int
    constants: RuleConstants = CELO_CONSTANTS
    vector_factored_groups: bool = True
    param_scale_floor: float | None = None

    @property
    def num_decays(self) -> int:
        return len(self.momentum_decays)

    @property
    def kernel_shape(self) -> KernelShape:
        return KernelShape(self.num_decays, self.hidden, self.hidden_layers, self.constants)

    @classmethod
    def of(cls, net: MetaModel) -> RuleConfig:
        """``net``'s configuration (``CeloNet`` or ``Celo2Net``: :meth:`MetaModel.rule_config`)."""
        return net.rule_config()


def c_defines(shape: KernelShape) -> tuple[str, ...]:
    """The compiler flags that give the C++ kernels this layout: the configuration (``CELO_K``
    decays, ``CELO_H`` hidden units, ``CELO_L`` hidden layers after the first), every constant of
    the rule (``CELO_<NAME>``, float literals) and the channel offsets (``CELO_CH_<GROUP>``)."""
    defines = [f"-DCELO_K={shape.decays}", f"-DCELO_H={shape.hidden}", f"-DCELO_L={shape.hidden_layers}"]
    defines += [f"-DCELO_{name}={value!r}f" for name, value in shape.constants.by_name().items()]
    defines += [f"-DCELO_CH_{name.upper()}={offset}" for name, offset in kernel_channel_offsets(shape.decays).items()]
    return tuple(defines)


def _decays(values: Sequence[float], device: torch.device | str | None) -> torch.Tensor:
    return torch.tensor(tuple(values), dtype=torch.float32, device=device)


@dataclass(frozen=True)
class UpdateWeights:
    """Meta-model weights for a batch of ``B`` tensors (one set per batch row), float32.

    ``first`` is the first layer's weight ``(B, F, hidden)`` as ``(in, out)`` and ``element_first``
    its rows of the per-element channels (groups :data:`ELEMENT_GROUPS`); ``hidden_layers`` the
    following ``(weight (B, out, in), bias (B, out))`` pairs; ``last`` keeps only the direction and
    magnitude rows ``((B, 2, hidden), (B, 2))``. Rows may be broadcast views (the optimizer shares
    one meta-model) or distinct (a meta-training population). ``momentum_decays`` and
    ``factored_decays`` are ``config``'s, as ``(k,)`` tensors on the weights' device.
    """

    config: RuleConfig
    first: torch.Tensor
    first_bias: torch.Tensor
    hidden_layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    last: tuple[torch.Tensor, torch.Tensor]
    momentum_decays: torch.Tensor
    factored_decays: torch.Tensor
    element_first: torch.Tensor

    @classmethod
    def from_mlp_layers(
        cls, net: MetaModel, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str
    ) -> UpdateWeights:
        """From per-row MLP layers ``[(weight (B, out, in), bias (B, out)), ...]`` and ``net``'s
        configuration (decays, multipliers)."""
        return cls.from_layers(RuleConfig.of(net), layers, device)

    @classmethod
    def from_layers(
        cls, config: RuleConfig, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str
    ) -> UpdateWeights:
        """From per-row MLP layers ``[(weight (B, out, in), bias (B, out)), ...]`` and a configuration."""
        layers = [(w.float().to(device), b.float().to(device)) for w, b in layers]
        (w0, b0), *hidden, (w_last, b_last) = layers
        first = w0.transpose(1, 2).contiguous()
        slices = group_slices(config.num_decays)
        return cls(
            config=config,
            first=first,
            first_bias=b0,
            hidden_layers=tuple(hidden),
            last=(w_last[:, :2], b_last[:, :2]),
            momentum_decays=_decays(config.momentum_decays, device),
            factored_decays=_decays(config.factored_decays, device),
            element_first=torch.cat([first[:, slices[name]] for name in ELEMENT_GROUPS], dim=1),
        )

    @classmethod
    def from_net(cls, net: MetaModel, device: torch.device | str) -> UpdateWeights:
        """One row holding ``net``'s MLP (expand it with :meth:`expand`)."""
        with torch.no_grad():
            layers = [(w.detach()[None], b.detach()[None]) for w, b in net.mlp_layers()]
        return cls.from_mlp_layers(net, layers, device)

    def expand(self, batch: int) -> UpdateWeights:
        """The same single row broadcast to ``batch`` rows (views, no copies)."""
        return self._each_row_tensor(lambda t: t.expand(batch, *t.shape[1:]))

    def row(self, index: int) -> UpdateWeights:
        """Batch row ``index`` alone (a batch of one; views)."""
        return self._each_row_tensor(lambda t: t[index : index + 1])

    def _each_row_tensor(self, change: Callable[[torch.Tensor], torch.Tensor]) -> UpdateWeights:
        """These weights with ``change`` applied to every tensor that has a batch axis."""
        return UpdateWeights(
            config=self.config,
            first=change(self.first),
            first_bias=change(self.first_bias),
            hidden_layers=tuple((change(w), change(b)) for w, b in self.hidden_layers),
            last=(change(self.last[0]), change(self.last[1])),
            momentum_decays=self.momentum_decays,
            factored_decays=self.factored_decays,
            element_first=change(self.element_first),
        )

    def group(self, name: str) -> torch.Tensor:
        """First-layer rows of feature group ``name``: ``(B, width, hidden)``."""
        return self.first[:, group_slices(self.config.num_decays)[name]]

    def without_groups(self, names: Sequence[str]) -> UpdateWeights:
        """These weights with the first-layer rows of the groups ``names`` zero (features that do
        not exist for some tensors contribute nothing)."""
        first = self.first.clone()
        slices = group_slices(self.config.num_decays)
        for name in names:
            first[:, slices[name]] = 0.0
        element_first = torch.cat([first[:, slices[name]] for name in ELEMENT_GROUPS], dim=1)
        return dataclasses.replace(self, first=first, element_first=element_first)


@dataclass(frozen=True)
class RowSharding:
    """A batch split across processes along its first parameter axis (FSDP2's ``Shard(0)``).

    This process holds some of the ``rows``; every statistic summed over that axis is summed over
    ``group`` too, so the update equals the unsharded one.
    """

    rows: int
    group: object

    def full_shape(self, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.rows, *local_shape[1:])


# ---- the kernels' contract --------------------------------------------------------------------------
#
# A chunk reaches the kernels as a 2-D grid per batch row: ``p``, ``g``, ``rms`` ``(B, a, b)`` and
# ``m`` ``(B, k, a, b)``. A matrix keeps its own rows and columns (``a`` rows of the chunk, ``b``
# columns), so its factored preconditioner and first-layer contribution arrive as a row factor and
# a column factor (``(B, k|H, a, 1)`` and ``(B, k|H, 1, b)``) that the kernels combine element by
# element: nothing of full size is built outside them. Other ranks arrive flattened as ``a = 1``
# with full-size factors.


class Grid(NamedTuple):
    """A chunk of a batch as the kernels see it (views: writes land in the parameters and state).

    ``p`` parameters and ``g`` gradients ``(B, a, b)`` (any float dtype; ``g`` unclipped), ``m``
    ``(B, k, a, b)`` and ``rms`` ``(B, a, b)`` the per-element accumulators (float32 or bfloat16).
    """

    p: torch.Tensor
    g: torch.Tensor
    m: torch.Tensor
    rms: torch.Tensor


class Preconditioners(NamedTuple):
    """Factors whose products (broadcastable to ``m``) precondition the gradient and the momentum."""

    q_g: Factors
    q_m: Factors


class Decays(NamedTuple):
    """What pass 1's moving averages need: ``momentum`` ``(k,)`` float32 and the ``rms`` decay."""

    momentum: torch.Tensor
    rms: float


class FoldedMlp(NamedTuple):
    """Pass 2's MLP with the tensor-wide normalisers folded in.

    ``first`` ``(B, C, H)``: the first layer's rows of the kernels' channels, times each channel's
    normaliser; ``hidden_layers`` ``((B, out, in), (B, out))`` pairs; ``last`` the direction and
    magnitude rows ``((B, 2, H), (B, 2))``; ``step_scale`` ``(B,)`` = param RMS x step_mult x lr.
    ``direction_out``: ``None`` (the step is taken: ``p <- p - step``), or a float32 ``(B, a, b)``
    grid that receives the MLP's raw direction instead, ``p`` left alone (Celo2, whose step is made
    from the whole tensor's directions).
    """

    first: torch.Tensor
    hidden_layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    last: tuple[torch.Tensor, torch.Tensor]
    exp_mult: float
    step_scale: torch.Tensor
    direction_out: torch.Tensor | None = None


@dataclass
class FactoredStatistics:
    """What a batch's factored moments give the per-element passes (rank >= 2 tensors).

    ``row_scale`` / ``col_scale``: the preconditioner's two factors, and ``row_hidden`` /
    ``col_hidden``: the row / column features' first-layer input (bias included in ``row_hidden``),
    each broadcastable to the batch's ``(B, k | H, *S)`` with size 1 along one factored axis.
    ``matrix``: the batch is of matrices (factors stay factors; higher ranks multiply them out).
    """

    row_scale: torch.Tensor
    col_scale: torch.Tensor
    row_hidden: torch.Tensor
    col_hidden: torch.Tensor
    matrix: bool


class Kernels(NamedTuple):
    """One backend's per-element work, in the driver's three passes.

    * ``square_sums(g, d0, d1)``: pass 0 on a chunk ``g (B, *S)`` of a rank >= 2 batch: ``clip(g)^2
      + eps`` summed over parameter axis ``d0`` and over ``d1``, float32 ``(B, *S without d0)`` and
      ``(B, *S without d1)``;
    * ``factored_statistics(g, state, w, d0)``: optionally, the whole of a batch's factored moments
      at once (update ``v_row`` / ``v_col`` in place, return :class:`FactoredStatistics`), or
      ``None`` where the backend leaves it to the driver (the driver always does it when sharded);
    * ``accumulate_(grid, preconditioners, decays)``: pass 1: update ``m`` and ``rms`` in place,
      return each channel's sum of squares over the chunk, float32 ``(B, C)``;
    * ``mlp_step_(grid, preconditioners, hidden_in, mlp)``: pass 2: the features, the MLP and ``p <-
      p - step`` in place; ``hidden_in`` terms whose sum (broadcastable to ``(B, H, a, b)``) is the
      rest of the first layer's pre-activation (bias plus row / col features);
    * ``whole_batch``: optionally a pair ``(channels_, mlp_step_on_channels_)`` for a batch that fits
      in one float32 chunk: pass 1 returning the stacked channels ``(B, C, a, b)`` that pass 2 then
      reuses (eager: fewer operations).
    """

    square_sums: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]
    factored_statistics: Callable[..., FactoredStatistics | None] | None
    accumulate_: Callable[[Grid, Preconditioners, Decays], torch.Tensor]
    mlp_step_: Callable[[Grid, Preconditioners, Factors, FoldedMlp], None]
    whole_batch: tuple[Callable[..., torch.Tensor], Callable[..., None]] | None = None
