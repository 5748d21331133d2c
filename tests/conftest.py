"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_clothing1m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Clothing1M copy in the official layout (14 classes x 3 images per split, 32x32 JPEGs).

    Shared by the whole session: copy it (shutil.copytree) before modifying it.
    """
    from sap_hf.data.clothing1m import write_tiny_clothing1m

    return write_tiny_clothing1m(tmp_path_factory.mktemp("clothing1m"), per_class=3, image_size=32, seed=0)


@pytest.fixture(autouse=True)
def _restore_transformers_verbosity():
    """Restore transformers' logging verbosity after each test: recipes/clothing1m.py's main(), which some
    tests call in this process, sets it to INFO, else for every later test (their stderr depends on the order)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    yield
    logging.set_verbosity(verbosity)
