"""Fixtures for the data tests: the real Omniglot (if METALOOP_DATA points at it), loaded once."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide METALOOP_CACHE, so that nothing is ever written into the data folder."""
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="session")
def omniglot_data_dir(omniglot_cache_dir: Path):
    """``Path($METALOOP_DATA)`` holding ``omniglot/images_background.zip``, else skip.

    For the whole session METALOOP_CACHE points at :func:`omniglot_cache_dir`.
    """
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
def omniglot_first_load(omniglot_data_dir: Path, omniglot_cache_dir: Path) -> dict:
    """The first (decoding) load of Omniglot "background" in this session, timed.

    Returns ``{"dataset": ClassImages, "seconds": float, "cache_before": [...], "cache_after": [...]}``.
    """
    from metaloop.data.omniglot import load_omniglot

    before = sorted(p.name for p in omniglot_cache_dir.iterdir())
    start = time.perf_counter()
    ds = load_omniglot("background", data_dir=omniglot_data_dir, download=False)
    seconds = time.perf_counter() - start
    after = sorted(p.name for p in omniglot_cache_dir.iterdir())
    return {"dataset": ds, "seconds": seconds, "cache_before": before, "cache_after": after}
