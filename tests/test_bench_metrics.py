"""The text-rendering scores against hand-computed cases (CVTG-2K and LongText-Bench definitions)."""

from __future__ import annotations

import pytest

from glm_image.bench.metrics import (
    CvtgScore,
    LongTextScore,
    closest_word,
    cvtg_aggregate,
    cvtg_score,
    levenshtein,
    longtext_aggregate,
    longtext_clean,
    longtext_score,
    similarity,
    split_words,
)


def ned(distance: int, longest: int) -> float:
    """The official per-word similarity, by hand: 1 - d / (max(len) + 1e-5)."""
    return 1 - distance / (longest + 1e-5)


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [("", "", 0), ("abc", "", 3), ("opening", "openlng", 1), ("kitten", "sitting", 3), ("福", "禄", 1)],
)
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)
    assert similarity(a, b) == pytest.approx(ned(d, max(len(a), len(b))))


def test_split_words_lowercases_keeps_punctuation_and_splits_chinese_by_character():
    assert split_words("  SALE!  Grand\tOpening ") == ["sale!", "grand", "opening"]
    assert split_words("春节快乐2025 OK") == ["春", "节", "快", "乐", "2025", "ok"]
    assert split_words("") == []


def test_cvtg_case_punctuation_and_repeated_words():
    # targets: grand, opening, sale!, sale!   OCR words: grand, openlng, sale!
    score = cvtg_score(["Grand Opening", "SALE! SALE!"], ["GRAND OPENlNG", "sale!"])
    assert (score.words, score.correct) == (4, 3)  # a repeated target word is found each time it is asked for
    assert score.word_accuracy == 0.75
    assert score.similarities == pytest.approx((1.0, ned(1, 7), 1.0, 1.0))  # opening ~ openlng
    assert score.ned == pytest.approx((3 + ned(1, 7)) / 4)


def test_cvtg_punctuation_is_part_of_the_word():
    score = cvtg_score(["SALE!"], ["SALE"])
    assert score.correct == 0 and score.similarities == pytest.approx((ned(1, 5),))  # ~0.8


def test_cvtg_chinese_is_scored_per_character():
    # 欢 迎 光 are read, 临 is read as 顾; 临 has ratio 0 with every OCR character, and difflib
    # breaks the tie towards the largest string: 顾 (U+987E) -> distance 1
    score = cvtg_score(["欢迎光临"], ["欢迎光顾"])
    assert (score.words, score.correct) == (4, 3)
    assert closest_word("临", ["欢", "迎", "光", "顾"]) == "顾"
    assert score.ned == pytest.approx((3 + ned(1, 1)) / 4)


def test_cvtg_nothing_read():
    score = cvtg_score(["Hi"], [])
    assert score.correct == 0 and score.similarities == pytest.approx((ned(2, 2),))  # paired with ''


def test_cvtg_ned_pairs_the_difflib_choice_not_the_nearest_by_edit_distance():
    # "salt" and "seal" both have SequenceMatcher ratio 0.75 with "sale"; difflib breaks the tie
    # towards the larger string, "seal", which is 2 edits away where "salt" is 1
    assert closest_word("sale", ["salt", "seal"]) == "seal"
    assert cvtg_score(["sale"], ["salt seal"]).similarities == pytest.approx((ned(2, 4),))


def test_cvtg_aggregate_weights_by_word_not_by_image():
    a = CvtgScore(4, 3, (1.0, 1.0, 1.0, 0.5))
    b = CvtgScore(2, 0, (0.0, 0.0))
    total = cvtg_aggregate([a, b])
    assert total["word_accuracy"] == 0.5  # 3 / 6, not the mean of 0.75 and 0
    assert total["ned"] == pytest.approx(3.5 / 6)
    assert (total["words"], total["correct_words"], total["images"]) == (6, 3, 2)


def test_longtext_clean_follows_the_official_preprocessing():
    assert longtext_clean("Hello,  World!\n don't", "en") == "hello world dont"
    assert longtext_clean("Café à la crème", "en") == "café à la crème"  # the kept accented letters
    assert longtext_clean("春节快乐，万事如意！ GLM 5", "zh") == "春节快乐万事如意GLM5"  # case kept in zh


def test_longtext_english_counts_words_as_a_multiset():
    score = longtext_score(["Hello, World!", "hello again"], "HELLO world... hello", "en")
    assert (score.matched, score.total) == (3, 4)  # hello x2, world; "again" missing
    assert longtext_score(["hello hello"], "hello", "en") == LongTextScore(1, 2)


def test_longtext_chinese_counts_characters_and_keeps_case():
    assert longtext_score(["春节快乐，万事如意！"], "春节快东 万事如", "zh") == LongTextScore(6, 8)
    assert longtext_score(["好好学习"], "好学习", "zh") == LongTextScore(3, 4)  # 好 twice, read once
    assert longtext_score(["GLM图像"], "glm图像", "zh") == LongTextScore(2, 5)


def test_longtext_aggregate_is_matched_over_total():
    total = longtext_aggregate([LongTextScore(3, 4), LongTextScore(1, 2)])
    assert total["text_score"] == pytest.approx(4 / 6) and (total["matched"], total["total"]) == (4, 6)


def test_longtext_rejects_an_unknown_language():
    with pytest.raises(ValueError, match="allowed: en, zh"):
        longtext_clean("x", "fr")
