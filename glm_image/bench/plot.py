"""`--plot PATH.png`: the per-stage seconds of a speed report, ours beside the reference.

matplotlib is optional (the ``plot`` extra): it is imported here, only when a plot is asked for,
and its absence is a one-line error that says what to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import GlmImageError

__all__ = ["check_plot_path", "plot_speed", "require_matplotlib"]

STAGES = (("ar_prefill_s", "AR prefill"), ("ar_decode_s", "AR decode"), ("dit_s", "DiT"), ("vae_s", "VAE"))


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise GlmImageError(
            "--plot needs matplotlib, which is not installed; install it with "
            "pip install 'glm-image[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only: never open a window, work without a display
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str | Path) -> Path:
    """``--plot``: matplotlib present, a writable file path, and a format it writes (from the
    suffix), all checked before the benchmark runs rather than after."""
    from .report import check_output_path

    plt = require_matplotlib()
    path = check_output_path(path, "--plot")
    suffix = path.suffix.lower().lstrip(".")
    if suffix:
        figure = plt.figure()
        try:
            formats = figure.canvas.get_supported_filetypes()
        finally:
            plt.close(figure)
        if suffix not in formats:
            raise GlmImageError(
                f"--plot {path}: matplotlib cannot write .{suffix} files; allowed: {', '.join(sorted(formats))}"
            )
    return path


def plot_speed(report: dict[str, Any], path: str | Path) -> Path:
    """One panel per (size, batch) case: seconds per stage (one call), a bar per engine."""
    plt = require_matplotlib()
    cases = report["results"]
    fig, axes = plt.subplots(1, len(cases), figsize=(max(6.4, 4.5 * len(cases)), 3.8), squeeze=False)
    engines = [("ours", "#1f77b4"), ("reference", "#ff7f0e")]
    width = 0.38
    for ax, case in zip(axes[0], cases, strict=True):
        present = [(name, color) for name, color in engines if case.get(name)]
        for i, (name, color) in enumerate(present):
            values = [case[name][key] for key, _ in STAGES]
            offsets = [j + (i - (len(present) - 1) / 2) * width for j in range(len(STAGES))]
            ax.bar(offsets, values, width, label=name, color=color)
        ax.set_xticks(range(len(STAGES)), [label for _, label in STAGES])
        ax.set_title(f"{case['size']}, batch {case['batch']}, {case['steps']} steps")
        ax.set_ylabel("seconds per call")
        ax.legend()
    config, machine = report["config"], report["machine"]
    fig.suptitle(f"{config['model']} on {machine['device']} ({config['dtype']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
