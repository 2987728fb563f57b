"""Prompt sets for `glm-image bench quality`: the built-in ones, and the official files if you have them.

Built-in (package data, written by us in the benchmarks' formats, English and Chinese):

- ``cvtg``: ``suites/cvtg.jsonl``, one CVTG-2K ``data_list`` entry per line (``index``,
  ``prompt``, ``carrier_list``, ``sentence_list``) plus ``area`` (the number of text regions,
  2-5: the official files are named by it) and ``lang``. Targets: the prompt's quoted spans, in
  every quote style the Glyph Encoder reads ('..', "..", “..”, 「..」), since those are what the
  model is asked to render.
- ``longtext``: ``suites/longtext.jsonl``, LongText-Bench lines (``prompt_id``, ``prompt``,
  ``text`` - the list of strings to render - and ``category``) plus ``lang``.

Official files (``--suite PATH``):

- CVTG-2K: the unzipped ``CVTG-2K/`` folder (``CVTG/`` and ``CVTG-style/`` each holding
  ``2.json`` .. ``5.json``; the ``*_combined.json`` files are skipped), one of those subfolders,
  or one ``N.json``. Targets as the official scorer takes them: single-quoted spans only.
- LongText-Bench: the folder holding ``text_prompts.jsonl`` (English) and/or
  ``text_prompts_zh.jsonl`` (Chinese), or one of the two files.

Any other ``.jsonl`` is read line by line: a line with a ``text`` list is a LongText item, any
other line with a ``prompt`` is a CVTG item; ``lang`` is taken from the line, else from the
file name (``_zh``), else from the text (CJK characters -> zh).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import GlmImageError
from ..models.glyph import glyph_texts

__all__ = ["BUILTIN_SUITES", "SuiteItem", "load_suite"]

BUILTIN_SUITES = ("cvtg", "longtext")
_OFFICIAL_QUOTES = re.compile(r"'(.*?)'")  # the CVTG-2K scorer's extract_words_from_prompt
_CJK = re.compile("[\u4e00-\u9fff]")


@dataclass(frozen=True)
class SuiteItem:
    id: str
    suite: str  # "cvtg" (Word Accuracy, NED) or "longtext" (text score)
    prompt: str
    lang: str  # "en" | "zh"
    targets: tuple[str, ...]  # the texts the image should show
    group: str = ""  # CVTG: "CVTG/3" (subset/regions); LongText: the category


def _lang(item: dict, texts, path: Path) -> str:
    lang = item.get("lang")
    if lang is not None:
        if lang not in ("en", "zh"):
            raise GlmImageError(f"{path}: lang = {lang!r}; allowed: en, zh")
        return lang
    if path.stem.endswith("_zh"):
        return "zh"
    return "zh" if any(_CJK.search(t) for t in texts) else "en"


def _cvtg_item(item: dict, where: str, path: Path, group: str, official: bool) -> SuiteItem:
    prompt = item.get("prompt")
    if not isinstance(prompt, str):
        raise GlmImageError(f'{where}: expected an object with a "prompt" string')
    targets = tuple(_OFFICIAL_QUOTES.findall(prompt) if official else glyph_texts(prompt))
    if not targets:
        raise GlmImageError(f"{where}: the prompt quotes no text to render")
    index = item.get("index", where.rsplit(" ", 1)[-1])
    name = f"{group}/{index}" if official else f"cvtg-{index}"
    return SuiteItem(name, "cvtg", prompt, _lang(item, targets, path), targets, group)


def _longtext_item(item: dict, where: str, path: Path) -> SuiteItem:
    prompt, texts = item.get("prompt"), item.get("text")
    if isinstance(texts, str):
        texts = [texts]
    if (
        not isinstance(prompt, str)
        or not isinstance(texts, list)
        or not all(isinstance(t, str) for t in texts)
    ):
        raise GlmImageError(f'{where}: expected "prompt" (a string) and "text" (a list of strings)')
    lang = _lang(item, texts, path)
    return SuiteItem(
        f"longtext-{lang}-{item.get('prompt_id', where.rsplit(' ', 1)[-1])}",
        "longtext",
        prompt,
        lang,
        tuple(texts),
        str(item.get("category", "")),
    )


def _read_jsonl(text: str, path: Path) -> list[SuiteItem]:
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise GlmImageError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise GlmImageError(f"{where}: expected a JSON object")
        if "text" in item:
            items.append(_longtext_item(item, where, path))
        else:
            group = f"{item['area']} regions" if "area" in item else ""
            items.append(_cvtg_item(item, where, path, group, official=False))
    return items


def _read_cvtg_json(path: Path) -> list[SuiteItem]:
    """One official CVTG-2K file: {"data_list": [{"index", "prompt", ...}, ...]}, named by its region count."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise GlmImageError(f"--suite {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data_list"), list):
        raise GlmImageError(f'--suite {path}: expected a CVTG-2K file with a "data_list" list')
    group = f"{path.parent.name}/{path.stem}"
    return [
        _cvtg_item(item, f"{path}, data_list[{i}]", path, group, official=True)
        for i, item in enumerate(data["data_list"])
    ]


def _cvtg_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("*.json") if p.stem.isdigit()), key=lambda p: int(p.stem))


def _read_path(path: Path) -> list[SuiteItem]:
    if path.is_dir():
        longtext = [path / "text_prompts.jsonl", path / "text_prompts_zh.jsonl"]
        if any(p.is_file() for p in longtext):
            return [item for p in longtext if p.is_file() for item in _read_path(p)]
        subsets = [d for d in sorted(path.iterdir()) if d.is_dir() and _cvtg_files(d)]
        files = _cvtg_files(path) or [f for d in subsets for f in _cvtg_files(d)]
        if not files:
            raise GlmImageError(
                f"--suite {path}: no CVTG-2K files (CVTG/2.json .. 5.json) or LongText-Bench files "
                "(text_prompts.jsonl, text_prompts_zh.jsonl) in it"
            )
        return [item for f in files for item in _read_cvtg_json(f)]
    if path.suffix == ".json":
        return _read_cvtg_json(path)
    try:
        return _read_jsonl(path.read_text(encoding="utf-8"), path)
    except OSError as e:
        raise GlmImageError(f"--suite {path}: cannot be read ({e.strerror})") from None


def load_suite(suite: str, limit: int | None = None) -> list[SuiteItem]:
    """The items of a built-in suite (``cvtg``, ``longtext``) or of a file or folder (see above)."""
    if limit is not None and limit < 1:
        raise GlmImageError(f"--limit = {limit}; allowed: an integer >= 1")
    if suite in BUILTIN_SUITES:
        name = f"{suite}.jsonl"
        text = resources.files("glm_image.bench").joinpath("suites", name).read_text(encoding="utf-8")
        items = _read_jsonl(text, Path(name))
    else:
        path = Path(suite).expanduser()
        if not path.exists():
            raise GlmImageError(
                f"--suite {suite!r}: no such file or folder; allowed: {', '.join(BUILTIN_SUITES)}, "
                "a .jsonl file, a CVTG-2K file or folder, a LongText-Bench folder"
            )
        items = _read_path(path)
    if not items:
        raise GlmImageError(f"--suite {suite}: no prompts in it")
    return items[:limit] if limit else items
