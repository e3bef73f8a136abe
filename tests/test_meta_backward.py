"""Meta-gradients accumulated a chunk of tasks at a time (``meta_backward``): equal to the
independent float64 reference for every strategy and chunk size, memory of one chunk, and the
measured ``auto`` strategy choice."""

import json
import time

import pytest
import torch
from gradient_helpers import TOLERANCE, batch_for, image_batch, max_difference, small_learner
from reference import cavia_loss, conv_net, maml_loss, meta_gradient, mlp_net, standard_conv_net

from metaloop import inner
from metaloop.algorithms.execution import chunk_size
from metaloop.config import ConfigError, load_config
from metaloop.nn.conv4_standard import StandardConv4
from metaloop.nn.functional import head_names
from metaloop.tasks.heterogeneous import TaskGroups, backward_over_tasks, mean_over_tasks
from metaloop.train import Trainer

STRATEGIES = ("loop", "vmap", "batched")


def backward_gradients(learner, batch, **kwargs):
    learner.zero_grad(set_to_none=True)
    metrics = learner.meta_backward(batch, **kwargs)
    return metrics, {name: p.grad.clone() for name, p in learner.named_parameters()}


def reference(learner, batch):
    """The reference loss and meta-gradient, by the learner's parameter names."""
    h = learner.hparams
    net = conv_net if h["backbone"] == "conv4" else mlp_net
    params = {k: p.detach().clone().requires_grad_() for k, p in learner.net.named_parameters()}
    steps = h["inner_steps"]
    if learner.name == "cavia":
        loss = cavia_loss(net, params, batch, h["inner_lr"], steps, h["num_context_params"])
        return loss, {"net." + k: v for k, v in meta_gradient(loss, params).items()}
    names = head_names(learner.net) if learner.name == "anil" else None
    if learner.name == "metasgd":
        alphas = {k: learner.alpha[k.replace(".", "-")].detach().clone().requires_grad_() for k in params}
        loss = maml_loss(net, params, batch, alphas, steps, h["first_order"], names)
        grads = meta_gradient(loss, {**params, **{"alpha:" + k: v for k, v in alphas.items()}})
        return loss, {
            ("alpha." + k[6:].replace(".", "-") if k.startswith("alpha:") else "net." + k): v
            for k, v in grads.items()
        }
    loss = maml_loss(net, params, batch, h["inner_lr"], steps, h["first_order"], names)
    return loss, {"net." + k: v for k, v in meta_gradient(loss, params).items()}


@pytest.mark.parametrize("chunk", [None, 1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "name,backbone",
    [("maml", "conv4"), ("maml", "mlp"), ("metasgd", "conv4"), ("anil", "conv4"), ("cavia", "conv4")],
)
def test_chunked_meta_gradient_equals_the_reference(name, backbone, strategy, chunk):
    learner = small_learner(name, backbone, inner_steps=2, strategy=strategy)
    batch = batch_for(backbone, tasks=5)
    metrics, grads = backward_gradients(learner, batch, max_task_chunk=chunk)
    ref_loss, ref_grads = reference(learner, batch)
    assert abs(metrics["loss"] - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE


def test_a_tiny_memory_budget_gives_chunks_of_one_and_the_same_gradient():
    learner = small_learner("maml", "conv4", inner_steps=2, strategy="batched")
    batch = image_batch(tasks=4)
    assert chunk_size("batched", 4, None, learner.task_graph_bytes(batch), 1e-6) == 1
    _, grads = backward_gradients(learner, batch, memory_budget_mb=1e-6)
    _, ref_grads = reference(learner, batch)
    assert max_difference(grads, ref_grads) < TOLERANCE


def test_scale_multiplies_and_gradients_accumulate():
    learner = small_learner("maml", "conv4", inner_steps=1, strategy="loop")
    batch = image_batch(tasks=3)
    _, once = backward_gradients(learner, batch)
    learner.meta_backward(batch, scale=0.5)  # on top of the 1.0 already in .grad
    assert (
        max_difference(
            {k: p.grad for k, p in learner.named_parameters()}, {k: 1.5 * g for k, g in once.items()}
        )
        < 1e-12
    )


def test_groups_of_unequal_tasks_give_the_gradient_of_the_mean_loss():
    learner = small_learner("maml", "conv4", inner_steps=1, strategy="loop")
    groups = TaskGroups(
        [image_batch(tasks=2, ways=3, shots=1, seed=1), image_batch(tasks=3, ways=2, shots=2, seed=2)],
        [torch.tensor([0, 2]), torch.tensor([1, 3, 4])],
    )
    learner.zero_grad(set_to_none=True)
    loss, metrics = mean_over_tasks(groups, learner.meta_loss)
    loss.backward()
    expected = {k: p.grad.clone() for k, p in learner.named_parameters()}
    learner.zero_grad(set_to_none=True)
    chunked = backward_over_tasks(groups, learner.meta_backward)
    assert max_difference({k: p.grad for k, p in learner.named_parameters()}, expected) < TOLERANCE
    assert chunked.keys() == metrics.keys()
    assert all(abs(chunked[k] - metrics[k]) < TOLERANCE for k in metrics)


class _Live:
    """Counts the bytes of tensors saved for backward that are alive at once."""

    def __init__(self):
        self.now = self.peak = 0

    def pack(self, tensor):
        size = tensor.numel() * tensor.element_size()
        self.now += size
        self.peak = max(self.peak, self.now)
        return _Held(tensor, size, self)


class _Held:
    def __init__(self, tensor, size, live):
        self.tensor, self.size, self.live = tensor, size, live

    def __del__(self):
        self.live.now -= self.size


def peak_saved_bytes(learner, batch, **kwargs):
    live = _Live()
    with torch.autograd.graph.saved_tensors_hooks(live.pack, lambda held: held.tensor):
        learner.meta_backward(batch, **kwargs)
    return live.peak


@pytest.mark.parametrize("strategy,chunk", [("loop", None), ("batched", 1), ("batched", 2)])
def test_graph_memory_does_not_grow_with_the_meta_batch(strategy, chunk):
    """Saved tensors alive at once (vmap's torch.func.grad does not allow the counting hooks)."""
    learner = small_learner("maml", "conv4", inner_steps=2, strategy=strategy)
    small = peak_saved_bytes(learner, image_batch(tasks=2), max_task_chunk=chunk)
    large = peak_saved_bytes(learner, image_batch(tasks=8), max_task_chunk=chunk)
    whole = peak_saved_bytes(learner, image_batch(tasks=8), max_task_chunk=8)
    assert large < 1.2 * small
    if strategy != "loop":  # the unchunked batch holds every task's graph at once
        assert whole > 2.5 * large


def fresh_strategy_cache(tmp_path, monkeypatch):
    """An empty strategies.json at tmp_path, and nothing remembered in this process."""
    monkeypatch.setattr(inner, "strategy_cache_path", lambda: tmp_path / "strategies.json")
    monkeypatch.setattr(inner, "_MEASURED", {})


def test_fastest_strategy_times_the_candidates_and_remembers(tmp_path, monkeypatch):
    fresh_strategy_cache(tmp_path, monkeypatch)
    delays = {"loop": 0.02, "vmap": 0.001, "batched": 0.01}
    calls = []

    def step(strategy):
        calls.append(strategy)
        time.sleep(delays[strategy])

    assert inner.fastest_strategy("k1", STRATEGIES, step, repeats=2) == "vmap"
    assert calls == [*STRATEGIES] * 3  # a warm-up each, then two timed rounds taking turns
    assert json.loads((tmp_path / "strategies.json").read_text()) == {"k1": "vmap"}
    calls.clear()
    assert inner.fastest_strategy("k1", STRATEGIES, step) == "vmap" and calls == []  # cached
    monkeypatch.setattr(inner, "_MEASURED", {})  # a new process: reads the file
    assert inner.fastest_strategy("k1", STRATEGIES, step) == "vmap" and calls == []
    assert inner.fastest_strategy("k1", ("loop", "batched"), step) == "batched"  # not a candidate: measured


def test_auto_measures_without_changing_gradients_rng_or_results(tmp_path, monkeypatch):
    fresh_strategy_cache(tmp_path, monkeypatch)
    learner = small_learner("maml", "conv4", inner_steps=2, strategy="auto")
    batch = image_batch(tasks=4)
    torch.manual_seed(5)
    _, grads = backward_gradients(learner, batch)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # the measurement drew nothing from the global RNG
    _, ref_grads = reference(learner, batch)
    assert max_difference(grads, ref_grads) < TOLERANCE
    key = learner.strategy_key(batch.support_x, batch.query_x, True)
    chosen = json.loads((tmp_path / "strategies.json").read_text())[key]
    assert chosen in STRATEGIES
    assert learner.active_strategy(batch.support_x, batch.query_x, True) == chosen


def test_reptile_with_adam_is_never_measured():
    learner = small_learner("reptile", "conv4", inner_optimizer="adam")
    assert learner.candidate_strategies() == ("loop",)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_standard_conv4_gives_the_reference_meta_gradient(strategy):
    """The benchmark's network (max-pooling, flattened features) under every strategy, chunks of 2."""
    learner = small_learner("maml", "conv4", inner_steps=2, strategy=strategy)
    torch.manual_seed(0)
    learner.net = StandardConv4(1, 4, 3, image_size=16).double()
    batch = image_batch(tasks=3)
    metrics, grads = backward_gradients(learner, batch, max_task_chunk=2)
    params = {k: p.detach().clone().requires_grad_() for k, p in learner.net.named_parameters()}
    ref_loss = maml_loss(standard_conv_net, params, batch, learner.hparams["inner_lr"], 2)
    ref_grads = {"net." + k: v for k, v in meta_gradient(ref_loss, params).items()}
    assert abs(metrics["loss"] - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE


@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize("name", ["maml", "metasgd", "cavia"])
def test_checkpointed_inner_steps_give_the_reference_meta_gradient(name, strategy):
    learner = small_learner(name, "conv4", inner_steps=3, strategy=strategy)
    learner.checkpoint_inner_steps = True
    batch = image_batch(tasks=3)
    metrics, grads = backward_gradients(learner, batch, max_task_chunk=2)
    ref_loss, ref_grads = reference(learner, batch)
    assert abs(metrics["loss"] - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE


def test_checkpointing_refuses_vmap():
    learner = small_learner("maml", "conv4", strategy="vmap")
    learner.checkpoint_inner_steps = True
    with pytest.raises(ValueError, match="checkpoint_steps works with strategy 'loop' or 'batched'"):
        learner.meta_backward(image_batch(tasks=2))
    assert small_learner("maml", "conv4", strategy="auto").candidate_strategies() == STRATEGIES
    learner.hparams["strategy"] = "auto"
    assert learner.candidate_strategies() == ("loop", "batched")


def test_checkpointed_graph_memory_does_not_grow_with_the_inner_steps():
    def peak(steps, checkpointed):
        learner = small_learner("maml", "conv4", inner_steps=steps, strategy="loop")
        learner.checkpoint_inner_steps = checkpointed
        return peak_saved_bytes(learner, image_batch(tasks=1))

    assert peak(6, False) > 2.5 * peak(2, False)  # without: every step's graph is held
    assert peak(6, True) < 1.5 * peak(2, True)


def test_the_trainer_applies_checkpointing_and_refuses_it_without_an_inner_loop(
    image_folder, tmp_path, tiny_cli_args
):
    def trainer(name):
        args = tiny_cli_args(
            image_folder, tmp_path / name, f"algorithm.name={name}", "train.checkpoint_inner_steps=true"
        )
        return Trainer(load_config(overrides=args[1::2]), progress=False)

    assert trainer("maml").learner.checkpoint_inner_steps
    with pytest.raises(
        ConfigError, match="checkpoint_inner_steps is for learners with a differentiable inner"
    ):
        trainer("protonet")


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_adml_task_by_task_equals_its_whole_batch_loss(attack):
    """FGSM attacks each task on its own, so ADML goes task by task; PGD keeps one backward."""
    learner = small_learner("adml", "conv4", inner_steps=1, strategy="loop", attack=attack, attack_steps=2)
    batch = image_batch(tasks=3)
    learner.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    expected = {k: p.grad.clone() for k, p in learner.named_parameters()}
    torch.manual_seed(3)
    metrics, grads = backward_gradients(learner, batch)
    assert learner.splits_by_task() == (attack == "fgsm")
    assert abs(metrics["loss"] - loss.item()) < TOLERANCE
    assert max_difference(grads, expected) < TOLERANCE
