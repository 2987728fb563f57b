"""The released size on one device: ``glm_image.bench.full`` (the ``full`` stage of gpu_run.sh).

python benchmarks/bench_full.py exact --out OUT/full/exact.json --device cuda --size 1024x1024
python benchmarks/bench_full.py merge --parts-dir OUT/full --out OUT/full.json
"""

import sys

from glm_image.bench.full import main

if __name__ == "__main__":
    sys.exit(main())
