"""What the meta-models of every update rule share: the per-parameter MLP, its initialisation, the
model card and the Hub I/O.

``MetaModel`` is the base of :class:`celo_hf.network.CeloNet` (Celo) and
:class:`celo_hf.celo2.network.Celo2Net` (Celo2). Each subclass names its update rule
(:class:`celo_hf.weight_files.UpdateRule`); ``save_pretrained`` / ``push_to_hub`` record that rule in
``config.json`` and ``from_pretrained`` refuses weights of another rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .weight_files import UPDATE_RULE_KEY, CeloWeightsError, UpdateRule, WeightFiles, read_weights

if TYPE_CHECKING:
    from .layout import RuleConfig

_Model = TypeVar("_Model", bound="MetaModel")


def model_card_template(*, title: str, contents: str, class_name: str, usage: str, rule_reference: str) -> str:
    """The model card ``save_pretrained`` / ``push_to_hub`` write next to the weights (a Jinja template
    of huggingface_hub's ``ModelCard``).

    Args:
        title: the optimizer's name (``"Celo"``).
        contents: what the weights are (``"its per-parameter update MLP"``).
        class_name: the meta-model class that writes them (``"celo_hf.CeloNet"``).
        usage: Python lines that load them (``"<this folder or Hub id>"`` stands for the weights).
        rule_reference: where the update rule these weights drive is described.
    """
    return f"""---
{{{{ card_data }}}}
---

# {title} meta-model (celo_hf format)

Weights of the learned optimizer {title}: {contents},
as `config.json` + `model.safetensors`, written by `{class_name}`. Use them with celo_hf:

```python
{usage}
```

- Paper: {{{{ paper_url }}}}
- Original (JAX) implementation: {{{{ repo_url }}}}
- The update rule these weights drive: {rule_reference}
"""


def paired_decays(
    momentum_decays: Sequence[float], factored_decays: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The momentum and factored decays as tuples of float; they must be as many (the factored-momentum
    feature pairs them up)."""
    if len(momentum_decays) != len(factored_decays):
        raise ValueError(
            f"momentum_decays {tuple(momentum_decays)} and factored_decays {tuple(factored_decays)} "
            "must have the same length: the factored-momentum feature pairs them up"
        )
    return tuple(float(d) for d in momentum_decays), tuple(float(d) for d in factored_decays)


def per_parameter_mlp(num_features: int, hidden_size: int, hidden_layers: int) -> nn.Sequential:
    """``Linear(F, w) -> ReLU -> [Linear(w, w) -> ReLU] * (hidden_layers - 1) -> Linear(w, 3)`` with
    ``F = num_features``, ``w = hidden_size``; outputs (direction, log-magnitude, unused)."""
    if hidden_layers < 1:
        raise ValueError(f"mlp_hidden_layers must be >= 1, got {hidden_layers}")
    layers: list[nn.Module] = [nn.Linear(num_features, hidden_size), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(hidden_size, hidden_size), nn.ReLU()]
    layers.append(nn.Linear(hidden_size, 3))
    return nn.Sequential(*layers)


def reset_linear(linear: nn.Linear) -> None:
    """The original's initialisation of a linear layer: weights truncated normal with std
    ``1/sqrt(fan_in)`` (cut at two std), zero bias."""
    std = linear.in_features ** -0.5
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(linear.bias)


class MetaModel(nn.Module, PyTorchModelHubMixin):
    """A learned update rule's meta-parameters: ``mlp``, the per-parameter MLP (built with
    :func:`per_parameter_mlp`), plus whatever else the rule learns; in this project's format on disk
    and on the Hub, tagged with the rule.

    Subclasses set ``update_rule`` and pass the mixin's model-card keywords (``model_card_template``
    from :func:`model_card_template`, ``library_name``, ``repo_url``, ``paper_url``, ``tags``).
    """

    update_rule: ClassVar[UpdateRule]
    mlp: nn.Sequential

    def mlp_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The MLP's ``(weight (out, in), bias (out,))`` pairs, first layer first."""
        return [(m.weight, m.bias) for m in self.mlp if isinstance(m, nn.Linear)]

    def rule_config(self) -> RuleConfig:
        """The configuration of the update rule these weights drive (what the driver and the kernels read)."""
        raise NotImplementedError

    def _mlp_shape(self) -> dict[str, int]:
        """``hidden`` (the MLP's hidden width) and ``hidden_layers`` (after the first), for :meth:`rule_config`."""
        layers = self.mlp_layers()
        return {"hidden": layers[0][0].shape[0], "hidden_layers": len(layers) - 2}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the update MLP to normalised features ``(..., F)``; returns ``(..., 3)``."""
        return self.mlp(features)

    # ---- I/O -----------------------------------------------------------------------------------

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | Path, *, config: dict[str, Any] | None = None, **kwargs: Any
    ) -> str | None:
        """huggingface_hub's ``save_pretrained`` (``push_to_hub`` goes through it too), with the update
        rule recorded in ``config.json`` (key ``update_rule``) next to the constructor's arguments."""
        config = {**(self._hub_mixin_config if config is None else config), UPDATE_RULE_KEY: self.update_rule.name}
        return super().save_pretrained(save_directory, config=config, **kwargs)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls: type[_Model],
        pretrained: str | Path,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> _Model:
        """Load this rule's weights from a local folder or file, or a Hub model id, in either format.

        Accepted: a folder or Hub repo with ``config.json`` + ``model.safetensors`` (this project's
        format), or the paper's flax ``theta.state`` (a file, a folder holding one, or a Hub repo
        holding one). Weights of another update rule are refused. See
        :func:`celo_hf.weight_files.read_weights`.
        """
        files = read_weights(
            pretrained,
            rule=cls.update_rule,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )
        return cls.from_weight_files(files)

    @classmethod
    def from_weight_files(cls: type[_Model], files: WeightFiles) -> _Model:
        """The meta-model a checkpoint holds, strictly: its configuration must be one this class takes
        and its state dict must have exactly this configuration's entries and shapes; in eval mode."""
        try:
            net = cls(**files.config)
        except TypeError as err:
            raise CeloWeightsError(f"{files.config_source} has settings {cls.__name__} does not take: {err}") from err
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
