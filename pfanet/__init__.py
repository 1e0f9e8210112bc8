"""pfanet: Pyramid Feature Attention Network for salient object detection (Zhao & Wu, CVPR 2019)."""

from .model import PFANet, PFANetConfig
from .transforms import InputSpec

__version__ = "0.1.0"
__all__ = ["InputSpec", "PFANet", "PFANetConfig", "__version__"]
