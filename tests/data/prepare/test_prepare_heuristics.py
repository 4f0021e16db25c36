"""Each heuristic rule keeps one hand-made document and drops another, with the reason naming the rule."""
import dataclasses

import numpy as np
import pytest

from llm_jax.data.prepare import heuristics as h

GOOD = """The old mill stood beside the river for more than two hundred years. Farmers from the valley brought their
grain to it every autumn, and the miller weighed each sack before he turned the heavy wheel.

When the railway reached the town, most of that trade moved to the new factory near the station. The mill closed,
but the building was never pulled down.

Today it is a small museum with a cafe on the ground floor. Visitors can climb to the top, look at the machinery,
and read about the families who worked there. On warm evenings people sit outside and watch the water."""

QUALITY = h.GopherQualityConfig()
REPETITION = h.GopherRepetitionConfig()


BLOCKLIST = h.BlocklistConfig()


def _verdict(text: str, rule: str, quality=QUALITY, repetition=REPETITION, blocklist=BLOCKLIST):
    decision = h.check_document(text, h.HeuristicsConfig(quality, repetition, blocklist))
    matching = [v for v in decision.verdicts if v.rule == rule]
    assert len(matching) == 1, f"rule {rule!r} ran {len(matching)} times"
    return matching[0]


def _sentences(n: int) -> str:
    """n distinct plain sentences of six words each, one per line."""
    return "\n".join(f"The visitor number {i} reads a book." for i in range(n))


def test_the_good_document_passes_every_rule():
    decision = h.check_document(GOOD)
    assert decision.keep and decision.reason == ""
    assert all(v.keep and v.reason == "" for v in decision.verdicts)
    assert decision.scores["words"] == len(GOOD.split())


def _assert_drops(text, rule, reason_start, **configs):
    verdict = _verdict(text, rule, **configs)
    assert not verdict.keep
    assert verdict.reason.startswith(reason_start), verdict.reason
    decision = h.check_document(text, h.HeuristicsConfig(**{k: v for k, v in configs.items()}))
    assert not decision.keep and decision.reason


@pytest.mark.parametrize("rule", ["chars", "words", "mean_word_length", "hash_ratio", "ellipsis_ratio",
                                  "bullet_lines", "ellipsis_lines", "alpha_words", "stop_words",
                                  "terminal_punct_lines"])
def test_quality_rules_keep_the_good_document(rule):
    verdict = _verdict(GOOD, rule, quality=dataclasses.replace(QUALITY, min_chars=100, max_chars=10_000))
    assert verdict.keep, verdict


def test_length_rules():
    chars = dataclasses.replace(QUALITY, min_chars=100, max_chars=500)
    _assert_drops(GOOD, "chars", f"chars {len(GOOD)} > max 500", quality=chars)
    _assert_drops("Too short.", "chars", "chars 10 < min 100", quality=chars)
    _assert_drops("The cat sat on the mat and that was all.", "words", "words 10 < min 50")
    _assert_drops(GOOD, "words", f"words {len(GOOD.split())} > max 40",
                  quality=dataclasses.replace(QUALITY, max_words=40))


def test_mean_word_length():
    tiny_words = " ".join(["a", "to", "be", "of", "it", "is", "at", "an"] * 10)
    _assert_drops(tiny_words, "mean_word_length", "mean_word_length 1.875 < min 3")
    long_words = " ".join(["internationalisation", "telecommunications", "counterrevolutionary"] * 20)
    _assert_drops(long_words, "mean_word_length", "mean_word_length 19.33 > max 10")


def test_symbol_ratios():
    hashtags = GOOD + "\n" + " ".join(f"#tag{i}" for i in range(20))          # 20 "#" in 124 tokens
    verdict = _verdict(hashtags, "hash_ratio")
    assert verdict.score == pytest.approx(20 / len(hashtags.split()))
    _assert_drops(hashtags, "hash_ratio", "hash_ratio 0.1")
    trailing = " ".join(f"well... the answer {i} is" for i in range(15))      # 15 in 75 tokens
    _assert_drops(trailing, "ellipsis_ratio", "ellipsis_ratio 0.2 > max 0.1")
    assert _verdict(GOOD.replace(".", "…", 2), "ellipsis_ratio").keep


def test_line_shape_rules():
    bullets = "\n".join(f"• item number {i} of the list." for i in range(60))
    _assert_drops(bullets, "bullet_lines", "bullet_lines 1 > max 0.9")
    half_bulleted = "\n".join(f"- the point {i} of that list." if i % 2 else f"The line {i} of the text."
                              for i in range(60))
    assert _verdict(half_bulleted, "bullet_lines").score == pytest.approx(0.5)
    assert _verdict(half_bulleted, "bullet_lines").keep
    cut_off = "\n".join(f"Line {i} of the story trails off and then..." if i % 2 else f"Line {i} of the story ends."
                        for i in range(20))
    _assert_drops(cut_off, "ellipsis_lines", "ellipsis_lines 0.5 > max 0.3")
    menu = "\n".join(["Home", "About us", "Products and prices", "Contact the team", "Read this first."] * 12)
    _assert_drops(menu, "terminal_punct_lines", "terminal_punct_lines 0.2 <= min 0.2",
                  quality=dataclasses.replace(QUALITY, min_terminal_punct_line_frac=0.2))
    assert _verdict(menu, "terminal_punct_lines").keep                    # 0.2 > 0.12 at the default


def test_alphabetic_words_and_stop_words():
    table = GOOD + "\n" + " ".join(str(1000 + i) for i in range(40))
    verdict = _verdict(table, "alpha_words")
    assert verdict.score == pytest.approx(len(GOOD.split()) / len(table.split()))
    _assert_drops(table, "alpha_words", "alpha_words 0.7")
    no_stop_words = " ".join(f"Cats chase mice {i} quickly." for i in range(20))
    _assert_drops(no_stop_words, "stop_words", "stop_words 0 < min 2")


@pytest.mark.parametrize("rule", ["dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac",
                                  "top_2gram_char_frac", "top_3gram_char_frac", "top_4gram_char_frac"]
                         + [f"dup_{n}gram_char_frac" for n in range(5, 11)])
def test_repetition_rules_keep_the_good_document(rule):
    verdict = _verdict(GOOD, rule)
    assert verdict.keep and verdict.score < 0.1, verdict


def test_duplicate_lines_and_paragraphs():
    repeated_lines = _sentences(10) + "\n" + "\n".join(["The visitor number 0 reads a book."] * 5)
    verdict = _verdict(repeated_lines, "dup_line_frac")
    assert verdict.score == pytest.approx(5 / 15)
    _assert_drops(repeated_lines, "dup_line_frac", "dup_line_frac 0.3333 > max 0.3")
    # Few repeated lines, but long ones: the character fraction catches what the line fraction lets through.
    long_line = "This long line holds most of the characters of the whole document and it comes back again."
    few_long = _sentences(6) + "\n" + long_line + "\n" + long_line
    assert _verdict(few_long, "dup_line_frac").keep
    _assert_drops(few_long, "dup_line_char_frac", "dup_line_char_frac")

    paragraphs = GOOD.split("\n\n")
    repeated_paras = "\n\n".join(paragraphs + [paragraphs[0]] * 2)
    assert _verdict(repeated_paras, "dup_para_frac").score == pytest.approx(2 / 5)
    _assert_drops(repeated_paras, "dup_para_frac", "dup_para_frac 0.4 > max 0.3")
    one_long_repeat = "\n\n".join([f"Short part {i}." for i in range(4)] + [paragraphs[0]] * 2)
    assert _verdict(one_long_repeat, "dup_para_frac").keep                # 1 of 6
    _assert_drops(one_long_repeat, "dup_para_char_frac", "dup_para_char_frac")


def test_ngram_fractions_by_hand():
    ids = np.array([0, 1, 0, 1, 0, 1])                                    # "a b a b a b"
    ones = np.ones(6, np.int64)
    assert h.top_ngram_char_frac(ids, ones, 2) == 1.0                     # "a b" three times covers every word
    assert h.top_ngram_char_frac(np.arange(6), ones, 2) == 0.0            # no 2-gram occurs twice
    lengths = np.array([3, 1, 3, 1, 3, 1])
    # "a b" and "b a" first occur at words 0 and 1; their repeats start at words 2, 3, 4 and cover words 2..5
    assert h.dup_ngram_char_frac(ids, lengths, 2) == pytest.approx(8 / 12)
    twice = np.concatenate([np.arange(10), np.arange(10)])
    assert h.dup_ngram_char_frac(twice, np.ones(20, np.int64), 5) == 0.5   # a text written twice: half
    assert h.dup_ngram_char_frac(np.arange(3), np.ones(3, np.int64), 5) == 0.0


def test_ngram_repetition_rules():
    chorus = " ".join(f"and the river runs past house {i}," for i in range(20))   # "and the" in every clause
    verdict = _verdict(chorus, "top_2gram_char_frac")
    assert not verdict.keep and verdict.reason.startswith("top_2gram_char_frac")
    assert verdict.score > 0.2
    sentence = "The committee will publish its final report on the new library next month after the meeting."
    echoed = GOOD + "\n" + "\n".join([sentence] * 4)
    for n in range(5, 11):
        verdict = _verdict(echoed, f"dup_{n}gram_char_frac")
        assert not verdict.keep and verdict.reason.startswith(f"dup_{n}gram_char_frac"), verdict
    assert _verdict(GOOD + "\n" + sentence, "dup_5gram_char_frac").score == 0.0


def test_blocklist_is_whole_word_and_case_insensitive():
    config = h.BlocklistConfig(words=("casino", "free money"), max_hits=1)
    spam = GOOD + "\nVisit our CASINO for FREE\n money, the best Casino in town."
    assert h.blocklist_hits(spam, config) == ["casino", "free money", "casino"]
    _assert_drops(spam, "blocklist_hits", "blocklist_hits 3 > max 1 (first: 'casino')", blocklist=config)
    innocent = GOOD + "\nThe casinos and freemoney words are not whole-word hits; one casino is allowed."
    verdict = _verdict(innocent, "blocklist_hits", blocklist=config)
    assert verdict.keep and verdict.score == 1
    assert _verdict(spam, "blocklist_hits").keep                          # no words configured, nothing blocked


def test_configs_reject_bad_values_by_name():
    with pytest.raises(ValueError, match="max_bullet_line_frac must be a fraction in \\[0, 1\\] or None, got 1.5"):
        h.GopherQualityConfig(max_bullet_line_frac=1.5)
    with pytest.raises(ValueError, match="dup_ngram_max_char_frac: n-gram size must be an int >= 1, got 0"):
        h.GopherRepetitionConfig(dup_ngram_max_char_frac=((0, 0.1),))
    with pytest.raises(TypeError, match="got the string 'casino'"):
        h.BlocklistConfig(words="casino")
    with pytest.raises(TypeError, match="a document must be a str, got bytes"):
        h.Document.from_text(b"bytes")


def test_rules_switched_off_do_not_run():
    quality = h.GopherQualityConfig(min_words=None, max_words=None, min_stop_words=None)
    rules = {v.rule for v in h.gopher_quality(h.Document.from_text(GOOD), quality)}
    assert "words" not in rules and "stop_words" not in rules and "chars" not in rules
    assert "mean_word_length" in rules
