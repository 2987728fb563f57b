"""Prompt sets: the built-in suites are well formed; the official dataset layouts load."""

from __future__ import annotations

import json

import pytest

from glm_image.bench.suites import load_suite
from glm_image.errors import GlmImageError
from glm_image.models.glyph import glyph_texts
from glm_image.validation import MAX_PROMPT_CHARS


def test_builtin_cvtg_has_two_to_five_regions_in_both_languages():
    items = load_suite("cvtg")
    assert len(items) >= 12 and {i.lang for i in items} == {"en", "zh"}
    assert {len(i.targets) for i in items} == {2, 3, 4, 5}
    assert [i.lang for i in items[:2]] == ["en", "zh"]  # --limit 2 covers both languages
    for item in items:
        assert item.suite == "cvtg" and len(item.prompt) <= MAX_PROMPT_CHARS
        assert item.group == f"{len(item.targets)} regions"


def test_builtin_longtext_quotes_exactly_its_target_text():
    items = load_suite("longtext")
    assert len(items) >= 12 and {i.lang for i in items} == {"en", "zh"}
    for item in items:
        assert item.suite == "longtext" and len(item.prompt) <= MAX_PROMPT_CHARS
        assert tuple(glyph_texts(item.prompt)) == item.targets  # the Glyph Encoder sees what is scored
    assert max(sum(len(t.split()) for t in i.targets) for i in items if i.lang == "en") >= 25


def test_limit_and_targets_from_every_quote_style(tmp_path):
    path = tmp_path / "mine.jsonl"
    prompt = "A 'Red' sign, a \u201cBlue\u201d door, a \"Green\" cup and a 「黄色」 flag"
    path.write_text(
        json.dumps({"index": 7, "prompt": prompt}) + "\n\n" + json.dumps({"prompt": "'x' 'y'"}) + "\n"
    )
    items = load_suite(str(path))
    assert items[0].targets == ("Red", "Blue", "Green", "黄色") and items[0].id == "cvtg-7"
    assert load_suite(str(path), limit=1) == items[:1]


def test_official_cvtg_layout_uses_single_quotes_only(tmp_path):
    root = tmp_path / "CVTG-2K"
    for subset, area, prompts in (
        ("CVTG", 2, ["A 'Red' sign and a \"Green\" cup 'Go'"]),
        ("CVTG-style", 3, ["'One' 'Two' 'Three'", "'A' 'B' 'C'"]),
    ):
        (root / subset).mkdir(parents=True)
        data = {"data_list": [{"index": i, "prompt": p} for i, p in enumerate(prompts)]}
        (root / subset / f"{area}.json").write_text(json.dumps(data))
        (root / subset / f"{area}_combined.json").write_text(json.dumps({"data_list": []}))
    items = load_suite(str(root))
    assert [i.id for i in items] == ["CVTG/2/0", "CVTG-style/3/0", "CVTG-style/3/1"]
    assert items[0].targets == ("Red", "Go")  # "Green" is not a target for the official scorer
    assert [i.id for i in load_suite(str(root / "CVTG-style" / "3.json"))] == [
        "CVTG-style/3/0",
        "CVTG-style/3/1",
    ]


def test_official_longtext_layout_takes_the_language_from_the_file(tmp_path):
    (tmp_path / "text_prompts.jsonl").write_text(
        json.dumps({"prompt_id": 0, "prompt": 'A sign "OPEN NOW"', "text": ["OPEN NOW"]}) + "\n"
    )
    (tmp_path / "text_prompts_zh.jsonl").write_text(
        json.dumps({"prompt_id": 0, "prompt": "一块写着「ABC」的牌子", "text": ["ABC"]}, ensure_ascii=False)
        + "\n"
    )
    items = load_suite(str(tmp_path))
    assert [(i.id, i.lang, i.targets) for i in items] == [
        ("longtext-en-0", "en", ("OPEN NOW",)),
        ("longtext-zh-0", "zh", ("ABC",)),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "line 1: not JSON"),
        ('{"prompt": "no quotes here"}', "quotes no text to render"),
        ('{"prompt": "p", "text": "ok", "lang": "fr"}', "lang = 'fr'; allowed: en, zh"),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_bad_suite_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(GlmImageError, match=message):
        load_suite(str(path))


def test_missing_suite_and_bad_limit():
    with pytest.raises(GlmImageError, match="no such file or folder; allowed: cvtg, longtext"):
        load_suite("/nonexistent/suite.jsonl")
    with pytest.raises(GlmImageError, match="--limit = 0"):
        load_suite("cvtg", limit=0)
