"""Shared tiny identity weights (built once per session) and an encoder loaded from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures.tiny_identity import make_tiny_identity_weights


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core box: one torch thread avoids oversubscription stalls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    return make_tiny_identity_weights(tmp_path_factory.mktemp("identity_weights"))


@pytest.fixture(scope="session")
def encoder(tiny_weights):
    from appleswap.identity.encoder import IdentityEncoder

    return IdentityEncoder.from_pretrained(tiny_weights, device="cpu")


@pytest.fixture(scope="session")
def photos(faces_dir):
    """Two real photos of one person and one of another, shrunk so the CPU tests stay fast."""
    import cv2

    from appleswap.files import load_image

    out = {}
    for name in ("obama.jpg", "obama1.jpg", "biden2.jpg"):
        image = load_image(faces_dir / name)
        k = 320 / max(image.shape[:2])
        out[name] = cv2.resize(image, (int(image.shape[1] * k), int(image.shape[0] * k)), interpolation=cv2.INTER_AREA)
    return out


@pytest.fixture
def flat_image():
    return np.full((200, 200, 3), 128, np.uint8)
