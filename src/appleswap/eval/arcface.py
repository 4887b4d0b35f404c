"""Old import path of :mod:`appleswap.face_metrics.arcface`, kept only for ``benchmarks/bench_train_step.py``
(being extended elsewhere); delete once it imports the new path."""

from appleswap.face_metrics.arcface import IRSE50, load_irse50

__all__ = ["IRSE50", "load_irse50"]
