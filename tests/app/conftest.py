"""A complete tiny weights folder (FLUX + PuLID + APPLE LoRAs + antelopev2 + EVA-CLIP) and an engine on it."""

from __future__ import annotations

import dataclasses

import pytest

from tests.fixtures.tiny_flux import TINY_IMAGE_SIZE, make_tiny_weights
from tests.fixtures.tiny_identity import make_tiny_identity_weights

FAST = {"size": TINY_IMAGE_SIZE, "steps": 1, "dtype": "fp32", "watermark": False}


@pytest.fixture(scope="session")
def app_weights(tmp_path_factory):
    root = make_tiny_weights(tmp_path_factory.mktemp("app_weights"))
    return make_tiny_identity_weights(root)


@pytest.fixture(scope="session")
def engine(app_weights):
    """Student engine at the tiny model's size, one step, no watermark (so pixel checks are exact)."""
    from appleswap.app.swap import SwapEngine
    from appleswap.app.swapper import SwapConfig

    return SwapEngine.load(SwapConfig(**FAST), app_weights, device="cpu")


@pytest.fixture(scope="session")
def identity(engine, faces_dir):
    return engine.source_identity([faces_dir / "obama1.jpg"])


def configured(engine, **changes):
    return engine.with_config(dataclasses.replace(engine.config, **changes))
