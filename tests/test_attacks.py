"""FGSM and PGD: they raise the loss, stay in the ε-ball and in [0, 1], PGD is the stronger, a seed
fixes PGD; and every learner's adapted predictor gives attacks input gradients (and nothing else)."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import make_class_images
from torch import nn

from metaloop.algorithms import LEARNERS, build_learner
from metaloop.attacks import fgsm, perturb, pgd
from metaloop.tasks import EpisodeSampler

EPSILON = 0.2


@pytest.fixture(scope="module")
def model_and_data():
    """A small conv net trained for a few steps on 6 synthetic classes of binary-ish images (so the
    clipping to [0, 1] matters), and the 60 images, which it classifies mostly right."""
    images = make_class_images(num_classes=6, per_class=10, seed=3).images.float() / 255  # [60, 1, 28, 28]
    labels = torch.arange(6).repeat_interleave(10)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 6),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):  # accurate, but not so confident that ε = 0.2 cannot move it
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, images, labels


def loss_of(model, images, labels):
    with torch.no_grad():
        return F.cross_entropy(model(images), labels).item()


def test_attacks_raise_the_loss_and_pgd_is_at_least_as_strong(model_and_data):
    model, images, labels = model_and_data
    clean = loss_of(model, images, labels)
    assert (model(images).argmax(-1) == labels).float().mean() > 0.9  # the model is trained-ish
    one_step = loss_of(model, fgsm(model, images, labels, EPSILON), labels)
    generator = torch.Generator().manual_seed(0)
    iterated = loss_of(model, pgd(model, images, labels, EPSILON, steps=10, generator=generator), labels)
    assert one_step > 5 * clean and one_step > clean + 0.1, (clean, one_step)
    assert iterated >= one_step, (one_step, iterated)
    assert all(p.grad is None for p in model.parameters())  # input gradients only


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
@pytest.mark.parametrize("epsilon", [0.03, 0.3])
def test_adversarial_images_stay_in_the_ball_and_in_pixel_range(model_and_data, attack, epsilon):
    model, images, labels = model_and_data
    adversarial = perturb(attack, model, images, labels, epsilon, steps=5, generator=torch.Generator())
    assert adversarial.shape == images.shape and not adversarial.requires_grad
    assert (adversarial - images).abs().max().item() <= epsilon + 1e-6
    assert adversarial.min().item() >= 0.0 and adversarial.max().item() <= 1.0
    inside = (images > epsilon) & (images < 1 - epsilon)  # pixels the clipping cannot reach
    moved = (adversarial - images).abs()
    assert ((images == 0) | (images == 1)).float().mean() > 0.5  # the clipping is exercised
    if attack == "fgsm":  # every unclipped pixel with a gradient moves by exactly ε
        assert torch.allclose(moved[inside & (moved > 0)], torch.tensor(epsilon), atol=1e-6)


def test_pgd_is_deterministic_for_a_seed(model_and_data):
    model, images, labels = model_and_data

    def attack(seed):
        return pgd(model, images, labels, EPSILON, steps=3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(attack(7), attack(7))
    assert not torch.equal(attack(7), attack(8))


def test_pgd_default_step_size_is_two_and_a_half_epsilon_over_steps(model_and_data):
    model, images, labels = model_and_data
    default = pgd(model, images, labels, EPSILON, steps=4, generator=torch.Generator().manual_seed(0))
    explicit = pgd(
        model,
        images,
        labels,
        EPSILON,
        steps=4,
        step_size=2.5 * EPSILON / 4,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(default, explicit)


@pytest.mark.parametrize(
    "attack, epsilon, steps, message",
    [
        ("cw", 0.1, 10, "unknown attack 'cw'; use one of fgsm, pgd"),
        ("fgsm", 0.0, 10, r"epsilon must be in \(0, 1\]"),
        ("pgd", 1.5, 10, r"epsilon must be in \(0, 1\]"),
        ("pgd", 0.1, 0, "at least 1 step"),
    ],
)
def test_bad_attack_settings_are_actionable_errors(model_and_data, attack, epsilon, steps, message):
    model, images, labels = model_and_data
    with pytest.raises(ValueError, match=message):
        perturb(attack, model, images, labels, epsilon, steps)


# small settings for whichever of them a learner takes (3-way tasks of 28x28 one-channel images)
SMALL = {"backbone": "conv4", "hidden": 8, "ways": 3, "num_classes": 12, "finetune_steps": 2}


def small(name):
    accepted = inspect.signature(LEARNERS[name]).parameters
    return build_learner(name, **{k: v for k, v in SMALL.items() if k in accepted})


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_adapted_predictor_gives_input_gradients_and_no_parameter_gradients(name, class_images):
    torch.manual_seed(0)
    learner = small(name)
    learner.eval()
    batch = EpisodeSampler(class_images, 3, 1, 2, seed=0).sample(1)
    predictor = learner.adapt(batch.support_x[0], batch.support_y[0])
    query_x, query_y = batch.query_x[0], batch.query_y[0]
    plain = predictor(query_x)
    assert not plain.requires_grad  # without an input that needs gradients, no graph is built
    x = query_x.clone().requires_grad_()
    logits = predictor(x)
    assert torch.allclose(logits, plain, atol=1e-5)
    loss = F.cross_entropy(logits, query_y)
    # every parameter the learner trains (MAML++ keeps its network's own batch-norm affine parameters
    # frozen, replaced by per-step copies: those cannot receive a gradient at all)
    parameters = [p for p in learner.parameters() if p.requires_grad]
    input_grad, *parameter_grads = torch.autograd.grad(loss, [x, *parameters], allow_unused=True)
    assert input_grad.abs().max() > 0
    assert all(g is None for g in parameter_grads), "the predictor must not reach the parameters"
    adversarial = fgsm(predictor, query_x, query_y, 0.3)
    with torch.no_grad():
        assert F.cross_entropy(predictor(adversarial), query_y) > loss.detach()
