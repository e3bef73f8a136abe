"""Few-shot prediction on your own images: adapt a trained learner to a support folder, classify queries.

The support folder is ``support/<class_name>/<images>`` (as in :mod:`metaloop.data.folder`); each
query image gets the support class with the highest probability, and the softmax of the learner's
logits over all support classes. Images are converted exactly as the training images were, by the
:class:`~metaloop.data.transform.InputTransform` the checkpoint records (size, channels, resize filter,
polarity, value range); a checkpoint of an older version gets the one its config implies. When the
support images' mean intensity is far from the training data's, :meth:`FewShotPredictor.fit_support`
warns (:class:`InputStatisticsWarning`) with what to do.

Example:
    >>> from metaloop import FewShotPredictor
    >>> model = FewShotPredictor.from_run("runs/default").fit_support("support_dir")
    >>> for p in model.predict(["query_dir", "extra.png"]):
    ...     print(p.path, p.label, p.probabilities)

All queries of one :meth:`FewShotPredictor.predict` call pass through the network as one batch,
as the queries of a test episode do: the MAML family's batch norm uses the statistics of the
batch it is given (transductive, as in :mod:`metaloop.nn.maml_conv`), so for those learners a
query's probabilities depend on the other queries it is predicted with. ProtoNet's do not.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from metaloop import distributed
from metaloop.algorithms.base import MetaLearner, Predictor
from metaloop.checkpoint import load_checkpoint
from metaloop.data.folder import IMAGE_EXTENSIONS, list_image_folder
from metaloop.data.transform import InputTransform, checkpoint_transform, statistics_warning
from metaloop.fileio import atomic_write_bytes
from metaloop.learners import learner_from_checkpoint


class InputStatisticsWarning(UserWarning):
    """Support images unlike the training data (mean intensity far from it): wrong polarity, say."""


@dataclass(frozen=True)
class Prediction:
    """One query: its path, the predicted class name and ``{class name: probability}``."""

    path: str
    label: str
    probabilities: dict[str, float]


class FewShotPredictor:
    """A meta-trained learner that classifies images into the classes of a support set.

    Args:
        learner: a trained image classifier (not a regression learner); it is moved to ``device``
            and put in eval mode.
        transform: how an image file becomes an input: the training data's
            (:func:`metaloop.data.transform.checkpoint_transform` of its checkpoint).
        device: where the network runs (``"cpu"``, ``"cuda"``, ``"auto"``).
    """

    def __init__(
        self, learner: MetaLearner, transform: InputTransform, device: str | torch.device = "cpu"
    ) -> None:
        check_classifier(learner)
        self.device = distributed.local_device(device)
        self.learner = learner.to(self.device).eval()
        self.transform = transform
        self.class_names: list[str] = []
        self.support_warning: str | None = None
        self._predictor: Predictor | None = None

    @classmethod
    def from_run(
        cls,
        checkpoint: str | os.PathLike,
        invert: bool | None = None,
        device: str | torch.device = "cpu",
    ) -> FewShotPredictor:
        """The model of a run folder (its ``best.pt``, else ``last.pt``) or of a checkpoint file, with
        the input transform of its training data.

        ``invert`` overrides the recorded polarity: True reads ``255 - pixel``, False the pixels as
        they are; ``None`` (the default) keeps the training data's.
        """
        state = load_checkpoint(checkpoint)
        learner = check_classifier(learner_from_checkpoint(state))
        transform = checkpoint_transform(state)
        if transform is None:
            raise ValueError(f"{checkpoint} records no input transform, so its model takes no images")
        if invert is not None:
            transform = dataclasses.replace(transform, invert=invert)
        return cls(learner, transform, device)

    @property
    def max_ways(self) -> int | None:
        """The most classes a support set can have (learners with a fixed output layer), else None."""
        return self.learner.fixed_ways

    def load_images(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """float ``[N, C, S, S]`` on the model's device, converted as the training images were."""
        return self.transform.to_float(self.transform.load_files(paths).to(self.device))

    def fit_support(self, support_dir: str | os.PathLike) -> FewShotPredictor:
        """Adapt to ``support_dir/<class_name>/<images>`` (classes sorted by name); returns ``self``.

        Support images whose mean intensity is far from the training data's (e.g. mostly white for
        a model trained on mostly black) set :attr:`support_warning` and emit an
        :class:`InputStatisticsWarning` saying what to do.

        Raises:
            FileNotFoundError: ``support_dir`` does not exist.
            ValueError: it is not a folder, has fewer than 2 class folders, a class folder without
                images, an unreadable image, or (fixed output layer) more than ``max_ways`` classes.
        """
        root = Path(support_dir).expanduser()
        if root.exists() and not root.is_dir():
            raise ValueError(f"support {root} is a file; expected a folder support/<class_name>/<images>")
        classes = list_image_folder(root)
        names = [name for name, _ in classes]
        ways = self.max_ways
        if ways is not None and len(classes) > ways:
            raise ValueError(
                f"this {self.learner.name} model has a fixed {ways}-way output layer, so the support set "
                f"can have at most {ways} classes; {root} has {len(classes)} ({', '.join(names)}). "
                f"Use at most {ways} class folders, or a learner without a fixed output (protonet, siamese, "
                "baseline)"
            )
        support_x = self.load_images([path for _, files in classes for path in files])  # [N, C, S, S]
        support_y = torch.repeat_interleave(
            torch.arange(len(classes)), torch.tensor([len(files) for _, files in classes])
        ).to(self.device)  # [N], class-major
        self._predictor = self.learner.adapt(support_x, support_y)
        self.class_names = names
        self.support_warning = statistics_warning(self.transform, self.transform.unit_mean(support_x))
        if self.support_warning is not None:
            warnings.warn(self.support_warning, InputStatisticsWarning, stacklevel=2)
        return self

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the support classes, ``[N, W]``, of images ``[N, C, S, S]`` in [0, 1]."""
        if self._predictor is None:
            raise RuntimeError("call fit_support(support_dir) before predicting")
        with torch.no_grad():
            return torch.softmax(self._predictor(images.to(self.device)).float(), dim=-1).cpu()

    def predict(self, queries: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Prediction]:
        """One :class:`Prediction` per query image, in sorted path order.

        ``queries`` are image files and folders; a folder contributes every image file below it
        (extensions as in :data:`metaloop.data.folder.IMAGE_EXTENSIONS`, dot-names skipped). A file
        named explicitly is read whatever its extension.

        Raises:
            FileNotFoundError: a query path does not exist.
            ValueError: no query image at all, or an image that cannot be read (named).
        """
        paths = query_paths(queries)
        probs = self.probabilities(self.load_images(paths))  # [N, W]
        return [
            Prediction(
                str(path),
                self.class_names[int(p.argmax())],
                {name: float(value) for name, value in zip(self.class_names, p, strict=True)},
            )
            for path, p in zip(paths, probs, strict=True)
        ]


def check_classifier(learner: MetaLearner) -> MetaLearner:
    """``learner``, if it classifies; ``ValueError`` for a regression model."""
    if learner.task_type != "classification":
        raise ValueError(
            f"this {learner.name} model is a {learner.task_type} model (e.g. sinusoid tasks); "
            "predict is for image classifiers. Evaluate it with 'metaloop eval' instead"
        )
    return learner


def query_paths(queries: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """The query image files named by ``queries`` (files, and the images found below folders), sorted,
    each once."""
    if isinstance(queries, (str, os.PathLike)):
        queries = [queries]
    found: set[Path] = set()
    for query in queries:
        path = Path(query).expanduser()
        if path.is_dir():
            found.update(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            found.add(path)
        else:
            raise FileNotFoundError(f"query {path} does not exist")
    if not found:
        raise ValueError(
            f"no query images in {', '.join(str(q) for q in queries) or 'an empty list'} "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
    return sorted(found)


def predictions_csv(predictions: Sequence[Prediction], class_names: Sequence[str]) -> str:
    """CSV text: a header ``path,predicted,p_<class>...`` then one row per prediction (6 decimals)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "predicted", *(f"p_{name}" for name in class_names)])
    for p in predictions:
        writer.writerow([p.path, p.label, *(f"{p.probabilities[name]:.6f}" for name in class_names)])
    return out.getvalue()


def write_predictions_csv(
    predictions: Sequence[Prediction], class_names: Sequence[str], path: str | os.PathLike
) -> None:
    """Write :func:`predictions_csv` to ``path`` atomically (a temporary file, then a rename)."""
    atomic_write_bytes(path, predictions_csv(predictions, class_names).encode())
