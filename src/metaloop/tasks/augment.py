"""Episode-level data augmentation for meta-training: more distinct tasks from the same classes.

``"rot90"`` turns every image of a task by the same random multiple of 90 degrees: a rotated class
is a new class, the trick Santoro et al. 2016 and Vinyals et al. 2016 used to quadruple Omniglot,
here applied per task to any dataset. ``"shift"`` translates every image independently by up to
``SHIFT_FRACTION`` of its size (zero fill, the background of Omniglot and the glyphs).
``"rot90+shift"`` does both. Label permutation needs no option: every episode assigns its labels
``0..W-1`` to freshly drawn classes in random order.

The random choices come from the episode sampler's generator, drawn right after each task, so a
seeded run (and its resume) sees the same augmented tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHIFT_FRACTION = 0.1
OPTIONS = ("rot90", "shift")


@dataclass(frozen=True)
class TaskAugmentation:
    """Which augmentations are on (see the module docstring)."""

    rot90: bool = False
    shift: bool = False

    @classmethod
    def parse(cls, spec: str) -> TaskAugmentation:
        """``"none"`` or options joined by ``+`` (``"rot90"``, ``"shift"``, ``"rot90+shift"``)."""
        parts = [] if spec == "none" else spec.split("+")
        unknown = sorted(set(parts) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown augmentation {spec!r}; use none, or {' / '.join(OPTIONS)} joined by '+' "
                "(e.g. rot90+shift)"
            )
        return cls(rot90="rot90" in parts, shift="shift" in parts)

    @property
    def active(self) -> bool:
        return self.rot90 or self.shift

    def draw(self, generator: torch.Generator, images: int, size: int) -> dict[str, torch.Tensor]:
        """Random choices for one task of ``images`` images of ``size`` x ``size`` pixels."""
        params = {}
        if self.rot90:
            params["turns"] = torch.randint(0, 4, (), generator=generator)
        if self.shift:
            reach = max(1, round(SHIFT_FRACTION * size))
            params["shifts"] = torch.randint(-reach, reach + 1, (images, 2), generator=generator)
        return params

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """One task's images ``[..., C, H, W]`` (uint8 or float) transformed by ``params``."""
        if "turns" in params:
            images = torch.rot90(images, int(params["turns"]), dims=(-2, -1))
        if "shifts" in params:
            shape = images.shape
            flat = images.reshape(-1, *shape[-3:])
            reach = int(params["shifts"].abs().max())
            padded = F.pad(flat, (reach, reach, reach, reach))
            h, w = shape[-2:]
            flat = torch.stack(
                [
                    padded[i, :, reach + dy : reach + dy + h, reach + dx : reach + dx + w]
                    for i, (dy, dx) in enumerate(params["shifts"].tolist())
                ]
            )
            images = flat.reshape(shape)
        return images
