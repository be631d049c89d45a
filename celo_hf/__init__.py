"""celo_hf: the learned optimizer Celo for PyTorch and HuggingFace Transformers."""

from typing import Any

from .hub import load_celo_net
from .network import CeloNet
from .optimizer import Celo, create
from .weight_files import CeloWeightsError

#: Names from ``celo_hf.trainer``, imported on first use (it imports transformers, which is slow).
_TRAINER_NAMES = ("CeloCallback", "CeloFactory", "CeloTrainer", "CeloTrainerMixin", "attach")

__all__ = ["Celo", "CeloNet", "CeloWeightsError", "create", "load_celo_net", *_TRAINER_NAMES]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'celo_hf' has no attribute {name!r}")
