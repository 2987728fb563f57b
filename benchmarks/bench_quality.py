"""Text-rendering quality (OCR, CVTG-2K and LongText-Bench scores): the script behind `glm-image bench quality`.

    python benchmarks/bench_quality.py --suite longtext --model /path/to/GLM-Image --out results/quality.json

Takes exactly the options of `glm-image bench quality` (see `--help` and benchmarks/README.md).
"""

from __future__ import annotations

import sys

from glm_image.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "quality", *sys.argv[1:]]))
