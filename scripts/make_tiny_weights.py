"""Write a complete TINY random weights folder (FLUX + PuLID + APPLE LoRAs + antelopev2 + EVA-CLIP) with the real
file names, key names and layouts, so every command can be tried end to end without the real weights.
Outputs are noise: this checks plumbing and geometry, not quality.

    .venv/bin/python scripts/make_tiny_weights.py /tmp/tiny-weights
    .venv/bin/appleswap swap -s a.jpg -t b.jpg -o out.jpg --weights-dir /tmp/tiny-weights --size 64 --steps 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.tiny_flux import make_tiny_weights
from tests.fixtures.tiny_identity import make_tiny_identity_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write the tiny weights folder")
    root = make_tiny_identity_weights(make_tiny_weights(parser.parse_args().folder))
    print(f"tiny weights written to {root}")


if __name__ == "__main__":
    main()
