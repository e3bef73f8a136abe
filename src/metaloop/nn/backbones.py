"""Networks by name: the built-in backbones, and a user's network given as an import path.

A recipe's ``algorithm.backbone`` is a built-in name (``conv4``, ``resnet12``, ``mlp``) or an
import path ``package.module:factory``; the factory is called with ``algorithm.backbone_args``
(a dict of plain values) and must return an ``nn.Module``. A checkpoint stores that name or
path and the arguments, never code, so it still loads with ``torch.load(weights_only=True)``;
the factory must be importable where the checkpoint is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

BUILTIN = ("conv4", "resnet12", "mlp")


class BackboneError(ValueError):
    """A backbone that cannot be built, loaded or used as asked (one line that says what to do)."""


def is_import_path(spec: str) -> bool:
    """Whether ``spec`` names a factory (``package.module:factory``) rather than a built-in."""
    return ":" in spec


def check_backbone_name(spec: str) -> None:
    """Raise :class:`BackboneError` unless ``spec`` is a built-in name or looks like an import path."""
    if spec not in BUILTIN and not is_import_path(spec):
        raise BackboneError(
            f"unknown backbone {spec!r}: use a built-in ({', '.join(BUILTIN)}) or an import path "
            "package.module:factory whose factory returns an nn.Module"
        )


def import_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``package.module:factory`` (``factory`` may be dotted: ``Class.method``)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise BackboneError(f"backbone {spec!r} is not an import path of the form package.module:factory")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # an ImportError, or whatever the module raised while importing
        raise BackboneError(
            f"backbone {spec!r}: module {module_name!r} cannot be imported "
            f"({type(error).__name__}: {error}); install it or put its folder on PYTHONPATH"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise BackboneError(f"backbone {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise BackboneError(f"backbone {spec!r} is a {type(target).__name__}, not a callable factory")
    return target


def network_from_path(spec: str, args: Mapping[str, Any] | None) -> nn.Module:
    """``factory(**args)`` for ``spec`` = ``package.module:factory``, checked to be an ``nn.Module``."""
    factory = import_factory(spec)
    try:
        network = factory(**dict(args or {}))
    except TypeError as error:
        raise BackboneError(
            f"backbone {spec!r} does not take backbone_args {dict(args or {})}: {error}"
        ) from error
    if not isinstance(network, nn.Module):
        raise BackboneError(
            f"backbone {spec!r} returned a {type(network).__name__}, not a torch.nn.Module; "
            "its factory must build and return the network"
        )
    return network


def describe(network: nn.Module | str) -> str:
    """A short name of a network for messages: the recipe's name or path, else the module's class."""
    return network if isinstance(network, str) else type(network).__name__


def object_spec(network: nn.Module) -> str:
    """What a learner built from a network object records as its backbone: the class, in angle
    brackets (no checkpoint can rebuild it; see :func:`check_rebuildable`)."""
    return f"<{type(network).__module__}.{type(network).__qualname__} object>"


def check_rebuildable(spec: str) -> None:
    """Raise :class:`BackboneError` for a backbone recorded by :func:`object_spec`."""
    if spec.startswith("<"):
        raise BackboneError(
            f"this learner's network was passed in as a Python object ({spec[1:-1]}); a checkpoint cannot "
            "rebuild it: build the learner over the same network again and load_state_dict(state['model']), "
            "or give the network as an import path (algorithm.backbone: package.module:factory)"
        )


def load_weights(network: nn.Module, path: str) -> None:
    """Load a state dict saved with ``torch.save(module.state_dict(), path)`` into ``network``
    (``weights_only=True``); every key must fit, else :class:`BackboneError` naming the
    missing and unexpected keys and the tensors whose shapes differ."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise BackboneError(f"backbone_weights {path!r} does not exist") from error
    except Exception as error:
        raise BackboneError(f"backbone_weights {path!r} is not a readable state dict: {error}") from error
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(
            f"backbone_weights {path!r} is not a state dict (name -> tensor); save it with "
            "torch.save(module.state_dict(), path)"
        )
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = [
            f"{label}: {', '.join(_first(names))}"
            for label, names in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shapes", shapes),
            )
            if names
        ]
        raise BackboneError(
            f"backbone_weights {path!r} do not fit the {type(network).__name__} backbone "
            f"({'; '.join(parts)}); save the state dict of the same network (same backbone and backbone_args)"
        )
    network.load_state_dict(state)


def _first(names: list[str], shown: int = 5) -> list[str]:
    """At most ``shown`` names, then how many more."""
    return names[:shown] + ([f"... ({len(names) - shown} more)"] if len(names) > shown else [])


def _builtin_args(name: str, args: Mapping[str, Any] | None, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``args`` checked against the keyword arguments a built-in backbone takes."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        takes = f"takes backbone_args {', '.join(allowed)}" if allowed else "takes no backbone_args"
        raise BackboneError(f"backbone {name!r} {takes}; got {', '.join(unknown)}")
    return args


def embedding_backbone(
    backbone: nn.Module | str, in_channels: int, hidden: int, args: Mapping[str, Any] | None
) -> tuple[nn.Module, str]:
    """The embedding network of an embedding learner (images ``[B, C, H, W]`` -> ``[B, D]``) and the
    backbone it records: a module passed in, ``"conv4"`` (:class:`Conv4` with ``hidden`` filters,
    ``args``: norm_scale_init),
    ``"resnet12"`` (:class:`ResNet12`, ``args``: widths, drop_rate, block_size) or an import path."""
    from metaloop.nn.conv4 import Conv4
    from metaloop.nn.resnet12 import ResNet12

    if isinstance(backbone, nn.Module):
        return backbone, object_spec(backbone)
    check_backbone_name(backbone)
    check_rebuildable(backbone)
    if backbone == "conv4":
        return Conv4(in_channels, hidden, **_builtin_args(backbone, args, ("norm_scale_init",))), backbone
    if backbone == "resnet12":
        kwargs = _builtin_args(backbone, args, ("widths", "drop_rate", "block_size"))
        return ResNet12(in_channels, **kwargs), backbone
    if backbone == "mlp":
        raise BackboneError(
            "backbone 'mlp' is the regression network of the gradient-based learners; use conv4 or resnet12"
        )
    return network_from_path(backbone, args), backbone


def adaptable_backbone(
    backbone: str,
    in_channels: int,
    hidden: int | None,
    ways: int,
    num_context_params: int,
    args: Mapping[str, Any] | None,
) -> nn.Module:
    """A built-in network of the optimisation-based learners, functional over tasks: ``"conv4"``
    (:class:`MamlConv4`), ``"resnet12"`` (:class:`MamlResNet12`, ``args``: widths, film_layer) with
    ``ways`` logits, or ``"mlp"`` (:class:`MLP`, ``in_channels`` inputs, one output); or a user's
    network from its import path (``args`` are its factory's)."""
    from metaloop.nn.maml_conv import MamlConv4
    from metaloop.nn.mlp import MLP
    from metaloop.nn.resnet12 import MamlResNet12

    check_backbone_name(backbone)
    check_rebuildable(backbone)
    if backbone == "conv4":
        return MamlConv4(in_channels, hidden, ways, num_context_params, **_builtin_args(backbone, args, ()))
    if backbone == "resnet12":
        kwargs = _builtin_args(backbone, args, ("widths", "film_layer"))
        return MamlResNet12(in_channels, ways, num_context_params=num_context_params, **kwargs)
    if backbone == "mlp":
        return MLP(
            in_channels, hidden, 1, num_context_params=num_context_params, **_builtin_args(backbone, args, ())
        )
    return network_from_path(backbone, args)


def probe(
    network: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, input_shape: tuple[int, ...]
) -> torch.Tensor:
    """``network`` on two zero inputs ``[2, *input_shape]`` with ``module`` (what it runs) in eval mode and
    without gradients; every training flag is restored, nothing else changes."""
    modes = [(m, m.training) for m in module.modules()]
    parameter = next(iter(module.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    try:
        for m, _ in modes:
            m.training = False
        with torch.no_grad():
            return network(torch.zeros(2, *input_shape, dtype=dtype))
    finally:
        for m, training in modes:
            m.training = training


def embedding_size(encoder: nn.Module, input_shape: tuple[int, ...]) -> int:
    """D, the size of ``encoder``'s embeddings ``[B, D]`` of inputs ``[B, *input_shape]`` (one probe)."""
    out = probe(encoder, encoder, input_shape)
    if out.dim() != 2:
        raise BackboneError(
            f"the {type(encoder).__name__} backbone maps inputs [2, {', '.join(map(str, input_shape))}] to "
            f"{list(out.shape)}; embeddings must be [2, D] (flatten the features in its forward)"
        )
    return int(out.shape[1])
