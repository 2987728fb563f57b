"""Text-rendering scores, as the published benchmarks define them. Pure functions, no OCR here.

**CVTG-2K** (TextCrafter, arXiv:2503.23461; scorer ``unified_metrics_eval.py`` shipped with the
dataset, https://huggingface.co/datasets/dnkdnk/CVTG-2K and github.com/NJU-PCALab/TextCrafter):

- target words: the quoted spans of the prompt, each lowercased and split on whitespace;
- OCR words: every recognised line, lowercased and split on whitespace (``['']`` if none);
- Word Accuracy = sum over images of target words found among the OCR words / sum of target
  words. A target word counts if it equals an OCR word; matches are not consumed, so a word the
  prompt repeats is found as often as it is asked for, even if the image shows it once;
- NED: each target word is paired with the OCR word ``difflib.get_close_matches(word, ocr_words,
  n=1, cutoff=0)`` picks (highest SequenceMatcher ratio; ties go to the largest string), and
  scores ``1 - levenshtein / (max(len) + 1e-5)``; NED is the mean over all target words of all
  images (not a mean of per-image means).

Punctuation is kept as it is, on both sides, as the official scorer does: ``'SALE!'`` asks for
``sale!``, and an image reading ``SALE`` scores 0 on that word (NED 0.8). The published numbers
were computed that way; stripping punctuation would make ours incomparable.

CVTG-2K is English. For Chinese we extend the split: every CJK character is a word of its own
(Chinese has no spaces), and a run of other characters between them is one word; English text
splits exactly as above.

**LongText-Bench** (X-Omni, arXiv:2507.22058; github.com/X-Omni-Team/X-Omni ``textbench/
summary_scores.py``): the target is the prompt's ``text`` list joined with spaces; target and OCR
text are cleaned by removing everything but CJK ideographs (U+4E00-U+9FA5), ASCII letters and
digits, whitespace and a few accented Latin letters; then

- English (``en``): whitespace collapsed, lowercased, split into words;
- Chinese (``zh``): whitespace removed too (case kept), split into characters;

matched = size of the multiset intersection of target and OCR units; the score is sum of matched
/ sum of target units over all images. Punctuation never counts here: the cleaning removes it.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CvtgScore",
    "LongTextScore",
    "closest_word",
    "cvtg_aggregate",
    "cvtg_score",
    "levenshtein",
    "longtext_aggregate",
    "longtext_clean",
    "longtext_score",
    "similarity",
    "split_words",
]

_CJK = "\u4e00-\u9fff"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_CJK_OR_RUN = re.compile(f"[{_CJK}]|[^{_CJK}]+")


def split_words(text: str) -> list[str]:
    """CVTG words of ``text``: lowercased, split on whitespace; each CJK character a word of its own."""
    words = []
    for token in text.lower().split():
        words.extend(_CJK_OR_RUN.findall(token) if _CJK_CHAR.search(token) else [token])
    return words


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def similarity(a: str, b: str) -> float:
    """The official scorer's normalised Levenshtein similarity: 1 - d / (max(len) + 1e-5)."""
    return 1 - levenshtein(a, b) / (max(len(a), len(b)) + 1e-5)


def closest_word(word: str, candidates: Sequence[str]) -> str | None:
    """The OCR word the official scorer pairs ``word`` with (difflib, cutoff 0)."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0)
    return found[0] if found else None


@dataclass(frozen=True)
class CvtgScore:
    """One image: target words, how many the OCR found, and each target word's similarity."""

    words: int
    correct: int
    similarities: tuple[float, ...]

    @property
    def word_accuracy(self) -> float:
        return self.correct / self.words if self.words else 0.0

    @property
    def ned(self) -> float:
        return sum(self.similarities) / len(self.similarities) if self.similarities else 0.0


def cvtg_score(spans: Iterable[str], ocr_lines: Iterable[str]) -> CvtgScore:
    """Score one image: ``spans`` the texts the prompt quotes, ``ocr_lines`` what the OCR read."""
    targets = [w for span in spans for w in split_words(span)]
    predicted = [w for line in ocr_lines for w in split_words(line)] or [""]
    correct = sum(1 for word in targets if word in predicted)
    similarities = []
    for word in targets:
        match = closest_word(word, predicted)
        similarities.append(similarity(word, match) if match is not None else 0.0)
    return CvtgScore(len(targets), correct, tuple(similarities))


def cvtg_aggregate(scores: Iterable[CvtgScore]) -> dict[str, float | int]:
    """Word Accuracy (word-weighted) and NED (mean over every target word) of a set of images."""
    scores = list(scores)
    words = sum(s.words for s in scores)
    correct = sum(s.correct for s in scores)
    similarities = [x for s in scores for x in s.similarities]
    return {
        "word_accuracy": correct / words if words else 0.0,
        "ned": sum(similarities) / len(similarities) if similarities else 0.0,
        "words": words,
        "correct_words": correct,
        "images": len(scores),
    }


_LONGTEXT_ACCENTS = "àâäéèêëîïôöùûüçÀÂÄÉÈÊËÎÏÔÖÙÛÜÇ"
_LONGTEXT_DROP = re.compile(f"[^\u4e00-\u9fa5a-zA-Z0-9\\s{_LONGTEXT_ACCENTS}]")
_LONGTEXT_KEEP_ZH = re.compile(f"[\u4e00-\u9fa5a-zA-Z0-9{_LONGTEXT_ACCENTS}]")


def longtext_clean(text: str, lang: str) -> str:
    """LongText-Bench's ``preprocess_string``: the text its matcher compares."""
    if lang == "en":
        return re.sub(r"\s+", " ", _LONGTEXT_DROP.sub("", text)).strip().lower()
    if lang == "zh":
        return "".join(_LONGTEXT_KEEP_ZH.findall(text))
    raise ValueError(f"lang = {lang!r}; allowed: en, zh")


@dataclass(frozen=True)
class LongTextScore:
    matched: int
    total: int

    @property
    def text_score(self) -> float:
        return self.matched / self.total if self.total else 0.0


def longtext_score(texts: Sequence[str], ocr_text: str, lang: str) -> LongTextScore:
    """Score one image: ``texts`` the prompt's target texts, ``ocr_text`` everything the OCR read."""
    target = longtext_clean(" ".join(texts), lang)
    read = longtext_clean(ocr_text, lang)
    units = (lambda s: s.split()) if lang == "en" else list
    wanted = Counter(units(target))
    matched = sum((wanted & Counter(units(read))).values())
    return LongTextScore(matched, sum(wanted.values()))


def longtext_aggregate(scores: Iterable[LongTextScore]) -> dict[str, float | int]:
    """Sum of matched over sum of target units (the official aggregate, not a mean of ratios)."""
    scores = list(scores)
    matched, total = sum(s.matched for s in scores), sum(s.total for s in scores)
    return {
        "text_score": matched / total if total else 0.0,
        "matched": matched,
        "total": total,
        "images": len(scores),
    }


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB of an 8-bit image against a reference of the same size
    (PIL images or arrays; peak 255); inf when they are identical."""
    import numpy as np

    a, b = (np.asarray(x, dtype=np.float64) for x in (image, reference))
    if a.shape != b.shape:
        raise ValueError(f"psnr: images of shapes {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
