"""The one progress-callback type of the engine, its stages and its entry points, and the
progress bars the command line shows with it."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "StageBars", "one_of"]

# progress(stage, done, total), called as work advances: stage "ar" counts the tokens the AR
# model has written, "dit" the denoising steps taken. Called on the thread doing the work.
Progress = Callable[[str, int, int], None]


def one_of(progress: Progress | None, index: int, count: int) -> Progress | None:
    """The progress of item ``index`` of ``count`` that run one after the other (a batch's rows
    decoded apart), reported as the whole batch's: the mean over the items, the total unchanged,
    so a caller sees what a batch run together would have shown."""
    if progress is None or count == 1:
        return progress

    def report(stage: str, done: int, total: int) -> None:
        progress(stage, (index * total + done) // count, total)

    return report


_LABELS = {"ar": ("AR tokens", "tok"), "dit": ("DiT steps", "step")}  # a bar's label and unit


class StageBars:
    """A ``Progress`` that shows one tqdm bar per stage. A stage's bar closes, and its clock
    stops, as soon as the stage is done (``done == total``) or the next stage reports: the stages
    run one after the other, so a bar left open would count the next stage's time as its own."""

    def __init__(self, file=None) -> None:
        self.file = file  # None: stderr, tqdm's default
        self.open: dict[str, object] = {}  # stage -> its bar, while it runs
        self._seen: set[str] = set()

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage not in self.open:
            if stage in self._seen:  # a report after the stage ended (its bar is closed): nothing to show
                return
            self.close()  # the stage before is over, whether or not it counted to its total
            label, unit = _LABELS.get(stage, (stage, "it"))
            self.open[stage] = tqdm(total=total, desc=label, unit=unit, leave=False, file=self.file)
            self._seen.add(stage)
        bar = self.open[stage]
        bar.update(done - bar.n)
        if done >= total:
            self.open.pop(stage).close()

    def close(self) -> None:
        """Close every open bar (at the end of a request, or when it fails)."""
        while self.open:
            self.open.popitem()[1].close()
