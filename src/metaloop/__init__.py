"""metaloop: meta-learning and few-shot learning on PyTorch."""

__version__ = "0.1.0"
