"""medssl_kit: dense self-supervised pre-training on medical images."""

__version__ = "0.1.0"
