"""The JSON layout every benchmark writes, for the scripts in this folder.

One copy lives in ``glm_image.bench.report`` (``glm-image bench`` writes it too); this module
re-exports it so a script here can ``from _report import ...`` without caring where it lives.
The layout is documented in benchmarks/README.md.
"""

from __future__ import annotations

from glm_image.bench.report import (
    SCHEMA,
    build_report,
    machine,
    markdown_table,
    median,
    parse_size,
    parse_sizes,
    save_report,
    synchronize,
    timed,
    write_report,
)

__all__ = [
    "SCHEMA",
    "build_report",
    "machine",
    "markdown_table",
    "median",
    "parse_size",
    "parse_sizes",
    "save_report",
    "synchronize",
    "timed",
    "write_report",
]
