#!/usr/bin/env python
"""Write a synthetic GLM-Image checkpoint: scripts/make_tiny_checkpoint.py OUT [--preset tiny|wide] [--seed N].

The same as `glm-image make-checkpoint`; importable as `glm_image.synthetic.make_checkpoint`.
"""

import sys

from glm_image.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-checkpoint", *sys.argv[1:]]))
