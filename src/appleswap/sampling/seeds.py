"""Seeds of the noises one swap draws besides the start noise x_T (drawn with the swap's seed itself)."""

from __future__ import annotations

import numpy as np

NOISE_STREAMS = {"condition": 1, "black_condition": 2}  # the VAE posterior samples, each a stream of its own


def derived_seed(seed: int, stream: str) -> int:
    """The seed of a posterior noise (``stream`` in NOISE_STREAMS) for noise seed ``seed``: derived, so each swap
    stays deterministic, but independent of x_T. One generator for both would give the same numbers on the CPU,
    and the condition tokens would carry a scaled copy of x_T (issue M8; the release draws them independently)."""
    state = np.random.SeedSequence([seed, NOISE_STREAMS[stream]]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))  # below 2**63: a valid torch seed
