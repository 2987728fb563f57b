"""The JSON layout every benchmark writes, for the scripts in this folder.

One copy lives in ``glm_image.bench.report`` (``glm-image bench`` writes it too); this module
re-exports it so a script here can ``from _report import ...`` without caring where it lives.
The layout is documented in benchmarks/README.md. ``print_report`` is the scripts' own: the
table and notes they print.
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
    ratio,
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
    "print_report",
    "ratio",
    "save_report",
    "synchronize",
    "timed",
    "write_report",
]


def print_report(report: dict) -> None:
    """A report's rows as a markdown table of their scalar fields (the first row's order first),
    then its notes: what a script prints after it writes the JSON."""
    rows = report["results"]
    headers = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, list)))
    print(markdown_table(headers, [[r.get(h) for h in headers] for r in rows]))
    for note in report.get("notes", []):
        print(note)
