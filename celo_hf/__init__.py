"""celo_hf: the learned optimizer Celo for PyTorch and HuggingFace Transformers."""

from .hub import CeloWeightsError, load_celo_net
from .network import CeloNet
from .optimizer import Celo, create

__all__ = ["Celo", "CeloNet", "CeloWeightsError", "create", "load_celo_net"]
__version__ = "0.1.0"
