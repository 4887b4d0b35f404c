"""Keep the native libraries' log lines (MediaPipe, TensorFlow Lite, absl, protobuf) out of the user's terminal.

Why here and not by filtering output: each library is quieted where it speaks. MediaPipe's Python bindings call
protobuf's ``MessageFactory.GetPrototype`` at import, which protobuf 5 removed: they print the AttributeError; the
shim below gives them the method back. glog/TensorFlow read ``GLOG_minloglevel`` / ``TF_CPP_MIN_LOG_LEVEL`` (set
before any import, inherited by worker processes). The MediaPipe wheel logs through absl's C++ logging and TFLite's
minimal logger, which read no environment variable and export no setter; so building a MediaPipe graph and its
first runs (where it logs the XNNPACK delegate and ``W0000`` feature notices) happen with the process's native
stderr (fd 2) sent to a temporary file, whose lines go to the ``appleswap.native`` logger at debug level
(``--log-level debug`` shows them). Python-level absl logging goes through the standard ``logging`` module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("appleswap.native")
QUIET_ENVIRONMENT = {
    "GLOG_minloglevel": "2",  # glog builds of MediaPipe: errors only
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow C++
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars (read at its import)
}
WARM_CALLS = 2  # a graph's first runs log its feature notices; later runs are silent
_lock = threading.RLock()
_depth = 0
_saved_fd: int | None = None
_capture: Any = None


def quiet_libraries() -> None:
    """Environment variables and shims that quiet the libraries at their source; call before importing them."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    _protobuf_get_prototype()
    absl_logging = sys.modules.get("absl.logging")  # imported by MediaPipe (import_mediapipe calls this again)
    if absl_logging is not None:
        absl_logging._warn_preinit_stderr = False  # its "logging before flag parsing" notice; records go to logging


def _protobuf_get_prototype() -> None:
    """Give protobuf >= 5 back ``MessageFactory.GetPrototype`` (= ``GetMessageClass``), which MediaPipe calls."""
    with contextlib.suppress(ImportError):
        from google.protobuf import message_factory

        if not hasattr(message_factory.MessageFactory, "GetPrototype"):
            def get_prototype(self, descriptor):
                return message_factory.GetMessageClass(descriptor)

            message_factory.MessageFactory.GetPrototype = get_prototype


@contextlib.contextmanager
def native_stderr() -> Iterator[None]:
    """Native code's writes to fd 2 inside this block go to the ``appleswap.native`` debug log (nested and
    thread-safe: the first entry redirects, the last exit restores and forwards the lines)."""
    global _depth, _saved_fd, _capture
    if log.isEnabledFor(logging.DEBUG) or not _can_redirect():
        yield
        return
    with _lock:
        if _depth == 0:
            sys.stderr.flush()
            _capture = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 - closed at the last exit
            _saved_fd = os.dup(2)
            os.dup2(_capture.fileno(), 2)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                os.dup2(_saved_fd, 2)
                os.close(_saved_fd)
                _capture.seek(0)
                lines = _capture.read().decode(errors="replace").splitlines()
                _capture.close()
                _saved_fd = _capture = None
                for line in lines:
                    if line.strip():
                        log.debug("%s", line)


def _can_redirect() -> bool:
    try:
        os.fstat(2)
    except OSError:
        return False
    return True


def import_mediapipe():
    """``import mediapipe`` with the shims and environment above, its import-time native output routed."""
    quiet_libraries()
    with native_stderr():
        import mediapipe
    quiet_libraries()
    return mediapipe


class QuietGraph:
    """A MediaPipe solution (``FaceDetection``, ``FaceMesh``) built, and run its first ``WARM_CALLS`` times, with
    native stderr routed to the debug log; then called directly.

    The graph opens its calculators (creating the TFLite interpreters, which log) on scheduler threads after the
    constructor returns; one run on a blank image inside the window waits for them (``process`` waits until the
    graph is idle), so none of that lands on the terminal later."""

    def __init__(self, build: Callable[[], Any]) -> None:
        import numpy as np

        with native_stderr():
            self._graph = build()
            self._graph.process(np.zeros((64, 64, 3), np.uint8))
        self._calls = 0

    def process(self, image):
        if self._calls >= WARM_CALLS:
            return self._graph.process(image)
        with native_stderr():
            result = self._graph.process(image)
        self._calls += 1
        return result

    def close(self) -> None:
        self._graph.close()
