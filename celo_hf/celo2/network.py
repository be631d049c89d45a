"""The Celo2 meta-model: the per-parameter update MLP of Celo2 and Celo2-base.

``Celo2Net`` holds Celo2's learned weights and the accumulator decays they were trained with. There
is no scheduler and no step or magnitude multiplier: the step's size is the learning rate
(``docs/celo2-algorithm.md`` §1, §9). It does not hold optimizer state. The reading of
checkpoints lives in :mod:`celo_hf.weight_files` (:func:`~celo_hf.weight_files.read_celo2_paper_checkpoint`),
what it shares with Celo's meta-model in :mod:`celo_hf.meta_model`.

Layout, with ``F = num_features`` (30 for three decays; tensors of rank < 2 use only the first 15
inputs, feature groups 0-8):

* ``mlp``: ``Linear(F, w) -> ReLU -> [Linear(w, w) -> ReLU] * (layers - 1) -> Linear(w, 3)``; outputs
  (direction, log-magnitude, unused). The released optimizers use only the direction.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..layout import RuleConfig, feature_group_widths
from ..meta_model import (
    MetaModel,
    model_card_template,
    paired_decays,
    per_parameter_mlp,
    reset_linear,
)
from ..weight_files import CELO2
from .rule import CONSTANTS

#: The model card ``save_pretrained`` / ``push_to_hub`` write next to the weights.
MODEL_CARD_TEMPLATE = model_card_template(
    title="Celo2",
    contents="its per-parameter update MLP",
    class_name="celo_hf.celo2.network.Celo2Net",
    usage=(
        "import celo_hf\n"
        'optimizer = celo_hf.Celo2(model, lr=1e-3, weights="<this folder or Hub id>")'
    ),
    rule_reference="`docs/celo2-algorithm.md` in celo_hf (Celo2 and Celo2-base)",
)


class Celo2Net(
    MetaModel,
    library_name="celo_hf",
    repo_url="https://github.com/amoudgl/celo",
    paper_url="https://arxiv.org/abs/2602.19142",
    tags=["learned-optimizer", "celo2"],
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """Celo2's learned weights plus the accumulator decays of the update rule they were trained with.

    The defaults are the released Celo2 and Celo2-base (which share this configuration; only the
    weights differ).

    Args:
        mlp_hidden_size: width of the per-parameter MLP's hidden layers.
        mlp_hidden_layers: number of hidden layers of that MLP.
        momentum_decays: decays of the gradient momenta (also the number of factored decays).
        rms_decay: decay of the second moment of the gradient.
        factored_decays: decays of the factored (row / column) second moments.
    """

    update_rule = CELO2

    def __init__(
        self,
        mlp_hidden_size: int = 8,
        mlp_hidden_layers: int = 2,
        momentum_decays: Sequence[float] = (0.9, 0.99, 0.999),
        rms_decay: float = 0.95,
        factored_decays: Sequence[float] = (0.9, 0.99, 0.999),
    ) -> None:
        super().__init__()
        self.momentum_decays, self.factored_decays = paired_decays(momentum_decays, factored_decays)
        self.rms_decay = float(rms_decay)
        self.group_widths = feature_group_widths(len(self.momentum_decays))
        self.num_features = sum(self.group_widths)
        self.mlp = per_parameter_mlp(self.num_features, mlp_hidden_size, mlp_hidden_layers)
        self.reset_parameters()

    def rule_config(self) -> RuleConfig:
        """Celo2's configuration: these decays, Celo2's constants, no step or magnitude multiplier
        (the step's size is the learning rate), no factored groups for vectors."""
        return RuleConfig(
            self.momentum_decays, self.factored_decays, self.rms_decay, step_mult=1.0, exp_mult=0.0,
            constants=CONSTANTS, vector_factored_groups=False, **self._mlp_shape(),
        )

    def reset_parameters(self) -> None:
        """The original's fresh initialisation: truncated-normal weights with std ``1/sqrt(fan_in)``
        and zero biases (``docs/celo2-algorithm.md`` §14)."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                reset_linear(module)
