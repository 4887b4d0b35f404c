"""Old import path of :mod:`appleswap.benchmark.utils`, kept only for ``benchmarks/bench_train_step.py`` (see
:mod:`appleswap.bench`)."""

from appleswap.benchmark.utils import init_random_

__all__ = ["init_random_"]
