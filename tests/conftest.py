"""Shared fixtures: small synthetic datasets, so most tests need neither downloads nor fonts."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaloop.data.base import ClassImages
from metaloop.tasks.episodes import EpisodeSampler


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n``), each worker gets an equal share of this machine's cores, for its own
    torch and for the processes its tests start (OMP_NUM_THREADS), so that workers do not oversubscribe
    the cores; alone, pytest leaves torch's default."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def make_class_images(
    num_classes: int = 12, per_class: int = 10, size: int = 28, seed: int = 0
) -> ClassImages:
    """Each class is a random blob pattern; its examples are noisy, shifted copies of it."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(num_classes, 1, 1, 7, 7, generator=g) > 0.5).float()
    patterns = torch.nn.functional.interpolate(coarse.flatten(0, 1), size=(size, size), mode="nearest")
    examples = patterns.unsqueeze(1).expand(-1, per_class, -1, -1, -1).clone()  # [K, N, 1, S, S]
    shifts = torch.randint(-2, 3, (num_classes, per_class, 2), generator=g)
    for k in range(num_classes):
        for i in range(per_class):
            examples[k, i] = torch.roll(examples[k, i], tuple(shifts[k, i].tolist()), dims=(-2, -1))
    flips = torch.rand(examples.shape, generator=g) < 0.1
    examples = torch.where(flips, 1 - examples, examples)
    images = (examples * 255).to(torch.uint8).flatten(0, 1)
    offsets = torch.arange(0, num_classes * per_class + 1, per_class)
    return ClassImages(images, offsets, [f"class{k:02d}" for k in range(num_classes)], "synthetic")


def episode_accuracies(learner, dataset: ClassImages, ev) -> torch.Tensor:
    """float64 ``[ev.episodes]``: query accuracy of each test episode of eval config ``ev``, computed
    without :mod:`metaloop.evaluate`: one task at a time through ``learner.adapt``, on the episodes
    evaluate draws (seed ``ev.seed``, in chunks of ``ev.batch_size``)."""
    sampler = EpisodeSampler(dataset, ev.ways, ev.shots, ev.queries, seed=ev.seed)
    learner.eval()
    values = []
    for start in range(0, ev.episodes, ev.batch_size):
        batch = sampler.sample(min(ev.batch_size, ev.episodes - start))
        for t in range(batch.num_tasks):
            logits = learner.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t])
            values.append((logits.argmax(-1) == batch.query_y[t]).double().mean())
    return torch.stack(values)


def write_image_folder(root: Path, dataset: ClassImages) -> Path:
    """Write ``dataset`` as ``root/<class>/<i>.png``."""
    for k, name in enumerate(dataset.class_names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(dataset.class_images(k)):
            Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    return root


def tiny_cli_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """``--set`` arguments for a seconds-long ProtoNet run on an image folder (3-way, hidden 8)."""
    sets = [
        "data.name=folder",
        f"data.root={root}",
        "algorithm.hidden=8",
        "train.ways=3",
        "train.queries=2",
        "train.steps=4",
        "train.val_every=2",
        "train.val_episodes=5",
        "eval.ways=3",
        "eval.queries=3",
        "eval.episodes=10",
        f"run_dir={run_dir}",
        *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(name="tiny_cli_args", scope="session")
def tiny_cli_args_fixture():
    return tiny_cli_args


@pytest.fixture
def class_images() -> ClassImages:
    return make_class_images()


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of 30 synthetic classes x 10 images (folder splits: 21 / 3 / 6 classes)."""
    return write_image_folder(tmp_path_factory.mktemp("folder"), make_class_images(num_classes=30, seed=1))


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide METALOOP_CACHE, so that nothing is ever written into the data folder."""
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="session")
def omniglot_source(omniglot_cache_dir: Path):
    """``Path($METALOOP_DATA)`` holding ``omniglot/images_background.zip``, else skip; for the whole
    session METALOOP_CACHE points at :func:`omniglot_cache_dir`. Tests ask for :func:`omniglot_data_dir`."""
    env = os.environ.get("METALOOP_DATA")
    if not env or not (Path(env) / "omniglot" / "images_background.zip").is_file():
        reason = (
            "real Omniglot not found: set METALOOP_DATA to a folder holding omniglot/images_background.zip, "
            "omniglot/images_evaluation.zip and omniglot/splits/vinyals/*.txt "
            "(metaloop data prepare omniglot)"
        )
        if os.environ.get("METALOOP_REQUIRE_DATA"):  # CI: never skip silently
            pytest.fail(reason)
        pytest.skip(reason)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METALOOP_CACHE", str(omniglot_cache_dir))
        yield Path(env)


@pytest.fixture(scope="session")
def omniglot_first_load(omniglot_source: Path, omniglot_cache_dir: Path) -> dict:
    """The first (decoding) load of Omniglot "background" in this session, timed: made before any test
    reads Omniglot (:func:`omniglot_data_dir` needs it), whichever test comes first, so it holds under
    pytest-xdist too, where each worker has its own session and cache.

    Returns ``{"dataset": ClassImages, "seconds": float, "cache_before": [...], "cache_after": [...]}``.
    """
    from metaloop.data.omniglot import load_omniglot

    before = sorted(p.name for p in omniglot_cache_dir.iterdir())
    start = time.perf_counter()
    ds = load_omniglot("background", data_dir=omniglot_source, download=False)
    seconds = time.perf_counter() - start
    after = sorted(p.name for p in omniglot_cache_dir.iterdir())
    return {"dataset": ds, "seconds": seconds, "cache_before": before, "cache_after": after}


@pytest.fixture(scope="session")
def omniglot_data_dir(omniglot_source: Path, omniglot_first_load: dict) -> Path:
    """``Path($METALOOP_DATA)`` with real Omniglot (else skip), its decoding first load already made."""
    return omniglot_source


@pytest.fixture(scope="session")
def generated_glyphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ClassImages, Path]:
    """The glyph "all" set (28x28, 20 per class, seed 0) generated once in this session (~10 s of CPU)
    with no METALOOP_CACHE, and the cache file ``load_glyphs`` wrote for it beside its data folder."""
    from metaloop.data.glyphs import load_glyphs

    data_dir = tmp_path_factory.mktemp("glyphs")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("METALOOP_CACHE", raising=False)
        dataset = load_glyphs("all", data_dir=data_dir)
    (cache_file,) = (data_dir / "cache").glob("glyphs-*.pt")
    return dataset, cache_file


@pytest.fixture(scope="session")
def seed_glyph_cache(generated_glyphs):
    """``seed(cache_dir=None)``: put the session's generated glyphs into ``cache_dir`` (default: the
    METALOOP_CACHE of the environment, if any) unless a file of that name is there, so that a test
    reads them (the cache path, which test_glyphs.py checks) instead of generating them again."""
    cache_file = generated_glyphs[1]

    def seed(cache_dir: Path | None = None) -> None:
        if cache_dir is None:
            if not os.environ.get("METALOOP_CACHE"):
                return
            cache_dir = Path(os.environ["METALOOP_CACHE"]).expanduser()
        target = Path(cache_dir) / cache_file.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(cache_file, partial)
            os.replace(partial, target)

    return seed


@pytest.fixture(autouse=True, scope="session")
def strategy_cache(tmp_path_factory: pytest.TempPathFactory):
    """``strategy="auto"`` remembers its measured choices in ``strategies.json``: in this test session
    a temporary one unless METALOOP_CACHE names a cache (never the user's ``~/.cache``)."""
    if os.environ.get("METALOOP_CACHE"):
        yield
        return
    import metaloop.inner

    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("strategies") / "strategies.json"
    patch.setattr(metaloop.inner, "strategy_cache_path", lambda: path)
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def learning_curve_laid_out_not_encoded(request, monkeypatch):
    """``metaloop train`` ends by drawing its learning curve as PNG and SVG, which costs seconds (more than
    a tiny run's training) and, as it never raises, checks nothing there. In tests it builds and lays
    out the same figure instead, raising on any error, without encoding the two files; tests of the
    files themselves (test_report.py) are marked ``real_learning_curve``; runs in a subprocess
    (test_distributed.py, test_crash_resume.py, ...) draw them as ever."""
    if request.node.get_closest_marker("real_learning_curve"):
        return
    import metaloop.cli_commands

    def lay_out(run_dir: Path) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        from metaloop.report import learning_curves_figure

        figure = learning_curves_figure({run_dir.name: run_dir})
        FigureCanvasAgg(figure)
        figure.draw_without_rendering()  # every artist laid out and drawn, as save_figure does first

    monkeypatch.setattr(metaloop.cli_commands, "_draw_learning_curve", lay_out)


# Tests whose outcome depends on floating-point details (precision, determinism, resume, gradient
# references, distributed equality): CI runs them again under lowered CPU kernels
# (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), so that a kernel-dependent test fails here first.
NUMERICS_MODULES = {
    "test_amp.py",
    "test_crash_resume.py",
    "test_distributed.py",
    "test_inner.py",
    "test_train.py",
    "test_compare.py",
    "test_meta_backward.py",
    "test_user_networks.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in NUMERICS_MODULES or item.path.parent.name == "algorithms":
            item.add_marker(pytest.mark.numerics)
