"""Write a complete TINY random weights folder with the real file names, key names and layouts: FLUX + PuLID +
APPLE LoRAs + antelopev2 + EVA-CLIP (swapping, generation), the SimSwap ArcFace and VGG16 (training losses), CLIP
ViT-L/14 + the LAION head (`preprocess --aesthetic`), the face parsers and occlusion segmenter, the 3DDFA-V3
assets and the evaluation networks, so every command of the README can be tried end to end without the real
weights. Outputs are noise: this checks plumbing and geometry, not quality.

    .venv/bin/python scripts/make_tiny_weights.py /tmp/tiny-weights
    .venv/bin/appleswap swap -s a.jpg -t b.jpg -o out.jpg --weights-dir /tmp/tiny-weights --size 64 --steps 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.tiny_extras import make_tiny_extra_weights
from tests.fixtures.tiny_flux import make_tiny_weights
from tests.fixtures.tiny_identity import make_tiny_identity_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write the tiny weights folder")
    root = make_tiny_extra_weights(make_tiny_identity_weights(make_tiny_weights(parser.parse_args().folder)))
    print(f"tiny weights written to {root}")


if __name__ == "__main__":
    main()
