"""metaloop: meta-learning and few-shot learning on PyTorch.

``from metaloop import FewShotPredictor`` gives the prediction API (:mod:`metaloop.predict`); it is
imported on first use, so ``import metaloop`` stays light.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {"FewShotPredictor": "metaloop.predict", "Prediction": "metaloop.predict"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metaloop' has no attribute {name!r}")


__all__ = ["FewShotPredictor", "Prediction", "__version__"]
