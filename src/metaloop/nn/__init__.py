"""Backbones usable as plain modules and with torch.func.functional_call."""

from metaloop.nn.conv4 import Conv4

__all__ = ["Conv4"]
