"""Old import path of :mod:`appleswap.benchmark`, kept only for ``benchmarks/bench_train_step.py`` until it imports
``appleswap.benchmark.models`` (it is being extended elsewhere); delete both aliases then."""

from appleswap.benchmark.models import BenchConfig, build_models

__all__ = ["BenchConfig", "build_models"]
