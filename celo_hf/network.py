"""The Celo meta-model: the per-parameter update MLP and the LSTM learned scheduler.

``CeloNet`` holds Celo's learned weights (its "meta-parameters") and the hyper-parameters that go
with them (accumulator decays, step multipliers). It does not hold optimizer state. The update maths
that uses it lives in :mod:`celo_hf.reference` and :mod:`celo_hf.driver` (feature layout:
:mod:`celo_hf.layout`); the reading of checkpoints in :mod:`celo_hf.weight_files`; what it shares
with Celo2's meta-model (the MLP, the Hub I/O) in :mod:`celo_hf.meta_model`.

Layout (``docs/celo-algorithm.md`` §6, §8), with ``H = lstm_hidden_size`` and ``F = num_features``:

* ``mlp``: ``Linear(F, w) -> ReLU -> [Linear(w, w) -> ReLU] * (layers - 1) -> Linear(w, 3)``; outputs
  are (direction, log-magnitude, unused).
* scheduler: ``pool_proj`` and ``input_proj`` (``Linear(18, H)`` each), ``lstm`` (``LSTMCell(H, H)``),
  ``lr_head`` (``Linear(H, 1)``) and the learned initial state ``init_hidden`` / ``init_cell`` ``(1, H)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .features import SCHEDULER_INPUT_SIZE
from .layout import RuleConfig, feature_group_widths
from .meta_model import MetaModel, model_card_template, paired_decays, per_parameter_mlp, reset_linear
from .step_gain import GAIN_SIGNALS
from .weight_files import CELO

#: The model card ``save_pretrained`` / ``push_to_hub`` write next to the weights.
MODEL_CARD_TEMPLATE = model_card_template(
    title="Celo",
    contents="its per-parameter update MLP and its LSTM learned scheduler",
    class_name="celo_hf.CeloNet",
    usage=(
        "import celo_hf\n"
        'optimizer = celo_hf.Celo(model.parameters(), total_steps=1000, weights="<this folder or Hub id>")'
    ),
    rule_reference="`docs/celo-algorithm.md` in celo_hf",
)


class CeloNet(
    MetaModel,
    library_name="celo_hf",
    repo_url="https://github.com/amoudgl/celo",
    paper_url="https://arxiv.org/abs/2501.12670",
    tags=["learned-optimizer", "celo"],
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """Celo's learned weights plus the hyper-parameters of the update rule they were trained with.

    Args:
        lstm_hidden_size: width ``H`` of the scheduler LSTM.
        mlp_hidden_size: width of the per-parameter MLP's hidden layers.
        mlp_hidden_layers: number of hidden layers of that MLP.
        momentum_decays: decays of the gradient momenta (also the number of factored decays).
        rms_decay: decay of the second moment of the gradient.
        factored_decays: decays of the factored (row / column) second moments.
        step_mult: constant multiplier of every step (0.001 in the paper).
        exp_mult: multiplier of the MLP's log-magnitude output before ``exp`` (0.001 in the paper).
        learned_schedule: multiply steps by the LSTM's ``lr_mult`` (the paper's phase 2). ``False`` is
            phase 1 of meta-training: the MLP alone sets the step.
        gain_threshold, gain_power, gain_signal: the gradient-scale gain (:mod:`celo_hf.step_gain`):
            steps times ``min(1, r / gain_threshold) ** gain_power``, where ``r`` is each tensor's
            ``||g|| / ||p||`` at each step (``gain_signal="tensor"``) or the median over tensors of
            it at the first step, one gain for the whole run (``"model_start"``). ``None`` (the
            paper's Celo v1) leaves every step as the MLP and scheduler set it.
        param_scale_floor: ``c``: a tensor of rank >= 2 steps as if its RMS were at least
            ``c / sqrt(k)``, ``k`` its size over all axes but the largest
            (:func:`celo_hf.layout.param_scale_floor`), so that a zero-initialised matrix (a LoRA
            ``B``) moves like an initialised one. ``None`` (the paper's Celo v1): every step scales
            with its tensor's RMS alone.
        fresh_gain: ``k``: under the ``"model_start"`` gain ``G``, the tensors in param groups marked
            ``"fresh"`` (newly initialised on a pretrained model, such as a new classifier head:
            :mod:`celo_hf.fresh_tensors`) take steps ``min(k, 1 / G)`` times the scheduler's
            (:func:`celo_hf.step_gain.fresh_tensor_gain`): up to ``k`` times larger while the
            pretrained body is slowed, and unchanged when nothing is (``G = 1``: a model trained
            from scratch, or LoRA, whose trainable tensors are all fresh). ``None``, or no
            model-start gain: fresh tensors step at the scheduler's ``lr_mult`` alone.
    """

    update_rule = CELO

    def __init__(
        self,
        lstm_hidden_size: int = 64,
        mlp_hidden_size: int = 4,
        mlp_hidden_layers: int = 2,
        momentum_decays: Sequence[float] = (0.9, 0.99, 0.999),
        rms_decay: float = 0.999,
        factored_decays: Sequence[float] = (0.9, 0.99, 0.999),
        step_mult: float = 0.001,
        exp_mult: float = 0.001,
        learned_schedule: bool = True,
        gain_threshold: float | None = None,
        gain_power: float = 1.0,
        gain_signal: str = "tensor",
        param_scale_floor: float | None = None,
        fresh_gain: float | None = None,
    ) -> None:
        super().__init__()
        self.momentum_decays, self.factored_decays = paired_decays(momentum_decays, factored_decays)
        if gain_threshold is not None and not gain_threshold > 0:
            raise ValueError(f"gain_threshold must be a positive number or None, got {gain_threshold!r}")
        if not gain_power >= 0:
            raise ValueError(f"gain_power must be >= 0, got {gain_power!r}")
        if gain_signal not in GAIN_SIGNALS:
            raise ValueError(f"gain_signal must be one of {GAIN_SIGNALS}, got {gain_signal!r}")
        if param_scale_floor is not None and not param_scale_floor > 0:
            raise ValueError(f"param_scale_floor must be a positive number or None, got {param_scale_floor!r}")
        if fresh_gain is not None and not fresh_gain >= 1:
            raise ValueError(f"fresh_gain must be a number >= 1 or None, got {fresh_gain!r}")
        self.rms_decay = float(rms_decay)
        self.step_mult = float(step_mult)
        self.exp_mult = float(exp_mult)
        self.learned_schedule = bool(learned_schedule)
        self.gain_threshold = None if gain_threshold is None else float(gain_threshold)
        self.gain_power = float(gain_power)
        self.gain_signal = gain_signal
        self.param_scale_floor = None if param_scale_floor is None else float(param_scale_floor)
        self.fresh_gain = None if fresh_gain is None else float(fresh_gain)
        self.group_widths = feature_group_widths(len(self.momentum_decays))
        self.num_features = sum(self.group_widths)

        self.mlp = per_parameter_mlp(self.num_features, mlp_hidden_size, mlp_hidden_layers)

        hidden = lstm_hidden_size
        self.pool_proj = nn.Linear(SCHEDULER_INPUT_SIZE, hidden)
        self.input_proj = nn.Linear(SCHEDULER_INPUT_SIZE, hidden)
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.lr_head = nn.Linear(hidden, 1)
        self.init_hidden = nn.Parameter(torch.zeros(1, hidden))
        self.init_cell = nn.Parameter(torch.zeros(1, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's fresh initialisation: truncated-normal MLP blocks with std ``1/sqrt(fan_in)``
        and zero biases; the LSTM's +1 forget-gate offset lives in ``lstm.bias_ih``."""
        mlp = [m for m in self.mlp if isinstance(m, nn.Linear)]
        for linear in (*mlp, self.pool_proj, self.input_proj, self.lr_head):
            reset_linear(linear)
        hidden = self.lstm.hidden_size
        std = (2 * hidden) ** -0.5
        for weight in (self.lstm.weight_ih, self.lstm.weight_hh):
            nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
        with torch.no_grad():
            self.lstm.bias_ih.zero_()
            self.lstm.bias_ih[hidden : 2 * hidden] = 1.0  # forget gate, PyTorch order i, f, g, o
            self.lstm.bias_hh.zero_()
        nn.init.zeros_(self.init_hidden)
        nn.init.zeros_(self.init_cell)

    # ---- the rule's settings --------------------------------------------------------------------

    def gain_in_use(self, signal: str) -> bool:
        """Whether the gradient-scale gain is on (``gain_threshold`` set) and reads ``signal``."""
        return self.gain_threshold is not None and self.gain_signal == signal

    def rule_config(self) -> RuleConfig:
        """Celo's configuration with these weights' decays, multipliers, MLP shape and param-scale floor."""
        return RuleConfig(
            self.momentum_decays, self.factored_decays, self.rms_decay, self.step_mult, self.exp_mult, **self._mlp_shape(),
            param_scale_floor=self.param_scale_floor,
        )

    # ---- the scheduler -------------------------------------------------------------------------

    def initial_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the learned initial LSTM state ``(hidden, cell)``, each ``(1, H)`` float32."""
        return self.init_hidden.detach().clone(), self.init_cell.detach().clone()

    def schedule(
        self, inputs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One scheduler step.

        Args:
            inputs: ``(1, 18)`` progress and loss features (the same row for every tensor, so one
                row stands for all; the reference's max over tensors is then the identity).
            state: LSTM ``(hidden, cell)``, each ``(1, H)``.

        Returns:
            ``lr_mult`` of shape ``(1,)`` (positive), and the new LSTM state.
        """
        pooled = torch.relu(self.pool_proj(inputs)).amax(dim=0, keepdim=True)
        hidden, cell = self.lstm(self.input_proj(inputs) + pooled, state)
        lr_mult = 0.1 * torch.exp(self.lr_head(hidden)).squeeze(-1)
        return lr_mult, (hidden, cell)
