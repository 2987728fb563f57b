"""End-to-end speed, ours vs the reference: the script behind `glm-image bench speed`.

    python benchmarks/bench_speed.py --model tiny --compare-reference --sizes 256x256 --steps 4 --out results/speed.json

Takes exactly the options of `glm-image bench speed` (see `--help` and benchmarks/README.md);
it exists so every number in benchmarks/README.md has a script in this folder behind it.
"""

from __future__ import annotations

import sys

from glm_image.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "speed", *sys.argv[1:]]))
