import math

import torch

from metaloop.tasks import SinusoidTasks


def test_shapes_ranges_and_a_true_sinusoid():
    batch = SinusoidTasks(shots=5, queries=7, seed=0).sample(200)
    assert batch.support_x.shape == (200, 5, 1) and batch.query_y.shape == (200, 7, 1)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5
    assert y.abs().max() <= 5
    # every task is A sin(x - phi): fit [a, b] in y = a sin x + b cos x by least squares, residual ~ 0
    design = torch.cat([torch.sin(x), torch.cos(x)], -1).double()  # [T, 12, 2]
    coef = torch.linalg.lstsq(design, y.double()).solution
    assert torch.allclose(design @ coef, y.double(), atol=1e-5)
    amplitude = coef.squeeze(-1).norm(dim=-1)  # sqrt(a^2 + b^2) = A
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5 + 1e-4
    phase = torch.atan2(-coef[:, 1, 0], coef[:, 0, 0])  # a = A cos phi, b = -A sin phi
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4


def test_deterministic_for_a_seed():
    a = SinusoidTasks(seed=3).sample(4)
    b = SinusoidTasks(seed=3).sample(4)
    c = SinusoidTasks(seed=4).sample(4)
    assert torch.equal(a.support_y, b.support_y)
    assert not torch.equal(a.support_y, c.support_y)
