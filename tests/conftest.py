"""Shared fixtures: tiny phantoms, generated once per test session."""

from __future__ import annotations

import pytest

from medssl_kit.data.phantom import make_phantom

TINY_SPLIT = {"pretrain": 2, "train": 3, "val": 1, "test": 2}


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """Manifest path of an 8-case 12×48×48 CT phantom (pretrain 2, train 3, val 1, test 2)."""
    out = tmp_path_factory.mktemp("tiny_phantom")
    return make_phantom(out, cases=8, seed=3, shape=(12, 48, 48), split=TINY_SPLIT, workers=1)


@pytest.fixture(scope="session")
def tiny_phantom_3d(tmp_path_factory):
    """As :func:`tiny_phantom` with 16 slices, so that the smoke profile's 16×32×32 patches fit
    every 3D network (a 4-level unet halves each side four times)."""
    out = tmp_path_factory.mktemp("tiny_phantom_3d")
    return make_phantom(out, cases=8, seed=3, shape=(16, 48, 48), split=TINY_SPLIT, workers=1)
