import math

import numpy as np
import pytest
import torch

from metaloop.algorithms.base import MetaLearner
from metaloop.evaluate import confidence_interval, evaluate
from metaloop.tasks import EpisodeSampler


def test_ci_formula_matches_a_direct_computation():
    values = torch.tensor([0.8, 0.9, 1.0, 0.6, 0.75, 0.95, 0.85])
    mean, ci95, std = confidence_interval(values)
    arr = values.double().numpy()
    assert mean == pytest.approx(arr.mean())
    assert std == pytest.approx(np.std(arr, ddof=1))
    assert ci95 == pytest.approx(1.96 * np.std(arr, ddof=1) / math.sqrt(len(arr)))


def test_ci_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        confidence_interval(torch.tensor([1.0]))


class FirstClassLearner(MetaLearner):
    """Always predicts label 0: accuracy is exactly 1/ways on every episode."""

    def meta_loss(self, batch):
        raise NotImplementedError

    def adapt(self, support_x, support_y):
        ways = int(support_y.max()) + 1
        return lambda query_x: torch.nn.functional.one_hot(
            torch.zeros(len(query_x), dtype=torch.long), ways
        ).float()


def test_evaluate_counts_episodes_and_accuracy(class_images):
    result = evaluate(
        FirstClassLearner(), EpisodeSampler(class_images, 4, 1, 3, seed=0), episodes=10, batch_size=3
    )
    assert result.episodes == 10 and result.ways == 4
    assert result.mean == pytest.approx(0.25) and result.ci95 == pytest.approx(0.0)
    assert "25.00 ± 0.00%" in str(result)
