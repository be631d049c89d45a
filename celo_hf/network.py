"""The Celo meta-model: the per-parameter update MLP and the LSTM learned scheduler.

``CeloNet`` holds Celo's learned weights (its "meta-parameters") and the hyper-parameters that go
with them (accumulator decays, step multipliers). It does not hold optimizer state. The update maths
that uses it lives in :mod:`celo_hf.reference` and :mod:`celo_hf.driver` (feature layout:
:mod:`celo_hf.layout`); the reading of checkpoints in :mod:`celo_hf.weight_files`.

Layout (``docs/celo-algorithm.md`` §6, §8), with ``H = lstm_hidden_size`` and ``F = num_features``:

* ``mlp``: ``Linear(F, w) -> ReLU -> [Linear(w, w) -> ReLU] * (layers - 1) -> Linear(w, 3)``; outputs
  are (direction, log-magnitude, unused).
* scheduler: ``pool_proj`` and ``input_proj`` (``Linear(18, H)`` each), ``lstm`` (``LSTMCell(H, H)``),
  ``lr_head`` (``Linear(H, 1)``) and the learned initial state ``init_hidden`` / ``init_cell`` ``(1, H)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .features import SCHEDULER_INPUT_SIZE
from .layout import feature_group_widths
from .weight_files import CeloWeightsError, WeightFiles, read_weights


#: The model card ``save_pretrained`` / ``push_to_hub`` write next to the weights (a Jinja template of
#: huggingface_hub's ``ModelCard``).
MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# Celo meta-model (celo_hf format)

Weights of the learned optimizer Celo: its per-parameter update MLP and its LSTM learned scheduler,
as `config.json` + `model.safetensors`, written by `celo_hf.CeloNet`. Use them with celo_hf:

```python
import celo_hf
optimizer = celo_hf.Celo(model.parameters(), total_steps=1000, weights="<this folder or Hub id>")
```

- Paper: {{ paper_url }}
- Original (JAX) implementation: {{ repo_url }}
- The update rule these weights drive: `docs/celo-algorithm.md` in celo_hf
"""


class CeloNet(
    nn.Module,
    PyTorchModelHubMixin,
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
        gain_threshold, gain_power: the gradient-scale gain (:mod:`celo_hf.step_gain`): each tensor's
            step times ``min(1, (||g|| / ||p||) / gain_threshold) ** gain_power``. ``None`` (the
            paper's Celo v1) leaves every step as the MLP and scheduler set it.
    """

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
    ) -> None:
        super().__init__()
        if len(momentum_decays) != len(factored_decays):
            raise ValueError(
                f"momentum_decays {tuple(momentum_decays)} and factored_decays {tuple(factored_decays)} "
                "must have the same length: the factored-momentum feature pairs them up"
            )
        if gain_threshold is not None and not gain_threshold > 0:
            raise ValueError(f"gain_threshold must be a positive number or None, got {gain_threshold!r}")
        if not gain_power >= 0:
            raise ValueError(f"gain_power must be >= 0, got {gain_power!r}")
        if mlp_hidden_layers < 1:
            raise ValueError(f"mlp_hidden_layers must be >= 1, got {mlp_hidden_layers}")
        self.momentum_decays = tuple(float(d) for d in momentum_decays)
        self.factored_decays = tuple(float(d) for d in factored_decays)
        self.rms_decay = float(rms_decay)
        self.step_mult = float(step_mult)
        self.exp_mult = float(exp_mult)
        self.learned_schedule = bool(learned_schedule)
        self.gain_threshold = None if gain_threshold is None else float(gain_threshold)
        self.gain_power = float(gain_power)
        self.group_widths = feature_group_widths(len(self.momentum_decays))
        self.num_features = sum(self.group_widths)

        layers: list[nn.Module] = [nn.Linear(self.num_features, mlp_hidden_size), nn.ReLU()]
        for _ in range(mlp_hidden_layers - 1):
            layers += [nn.Linear(mlp_hidden_size, mlp_hidden_size), nn.ReLU()]
        layers.append(nn.Linear(mlp_hidden_size, 3))
        self.mlp = nn.Sequential(*layers)

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
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                std = module.in_features ** -0.5
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(module.bias)
        for linear in (self.pool_proj, self.input_proj, self.lr_head):
            std = linear.in_features ** -0.5
            nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(linear.bias)
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

    # ---- the per-parameter MLP -----------------------------------------------------------------

    def mlp_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The MLP's ``(weight (out, in), bias (out,))`` pairs, first layer first."""
        return [(m.weight, m.bias) for m in self.mlp if isinstance(m, nn.Linear)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the update MLP to normalised features ``(..., F)``; returns ``(..., 3)``."""
        return self.mlp(features)

    # ---- I/O -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained: str | Path,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> CeloNet:
        """Load weights from a local folder or file, or a Hub model id, in either format.

        Accepted: a folder or Hub repo with ``config.json`` + ``model.safetensors`` (this project's
        format), or the paper's flax ``theta.state`` (a file, a folder holding one, or a Hub repo
        holding one). See :func:`celo_hf.weight_files.read_weights`.
        """
        files = read_weights(
            pretrained,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )
        return cls.from_weight_files(files)

    @classmethod
    def from_weight_files(cls, files: WeightFiles) -> CeloNet:
        """The meta-model a checkpoint holds, strictly: its configuration must be one ``CeloNet``
        takes and its state dict must have exactly this configuration's entries and shapes; in eval mode."""
        try:
            net = cls(**files.config)
        except TypeError as err:
            raise CeloWeightsError(f"{files.config_source} has settings CeloNet does not take: {err}") from err
        except ValueError as err:
            raise CeloWeightsError(f"{files.config_source}: {err}") from err
        expected, state = net.state_dict(), files.state
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise CeloWeightsError(
                f"{files.state_source} does not match {files.config_source}: missing {missing}, unexpected "
                f"{unexpected}, wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong]}"
            )
        net.load_state_dict(state)
        return net.eval()
