"""Session fixtures for the eval tests: tiny weight files (real key names) built once, mesh records of photos."""

from __future__ import annotations

import pytest

from tests.eval import tiny_weights


@pytest.fixture(scope="session")
def eval_weights(tmp_path_factory):
    """A --weights-dir holding every eval network (tiny IR-SE50/HopeNet/Deep3D/glint, random real-size Inception)."""
    return tiny_weights.weights_folder(tmp_path_factory.mktemp("eval_weights"))
