"""Shared fixtures. Tests never touch the network: hubs are forced offline, weights are built by the tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.pop("APPLESWAP_HOME", None)
os.environ["APPLESWAP_CACHE"] = tempfile.mkdtemp(prefix="appleswap-test-cache-")  # caches never land in ~/.cache

REPO = Path(__file__).resolve().parents[1]


def _faces_dir() -> Path:
    # a copy of shared/testdata/faces ships in tests/data so a fresh clone tests on its own
    for candidate in (os.environ.get("APPLESWAP_TESTDATA"), REPO / "tests" / "data" / "faces",
                      REPO.parent / "shared" / "testdata" / "faces"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise RuntimeError("test photos not found: set APPLESWAP_TESTDATA to shared/testdata/faces")


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The real public-domain test photos (shared/testdata/faces; see its README for who is who)."""
    return _faces_dir()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("APPLESWAP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set APPLESWAP_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _logging_as_found():
    """A test that runs a command (``setup_logging``: root level, handlers) must not change what the next test's
    ``caplog`` sees: the root logger's level and the appleswap loggers' levels are put back after every test."""
    import logging

    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    ours = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)
            if name.startswith("appleswap")}
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    for name, level in ours.items():
        logging.getLogger(name).setLevel(level)
