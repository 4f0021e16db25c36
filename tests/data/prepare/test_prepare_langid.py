"""The language identifier on short held-out sentences of each covered language, and on the default corpus."""
import numpy as np
import pytest

from llm_jax.data import default_corpus
from llm_jax.data.prepare import langid

# Not in the training text: other sentences, other words.
SAMPLES = {
    "en": ["She opened the window and looked at the garden, where the rain had stopped at last.",
           "Could you tell me which train goes to the airport?"],
    "de": ["Sie öffnete das Fenster und schaute in den Garten, wo der Regen endlich aufgehört hatte.",
           "Können Sie mir sagen, welcher Zug zum Flughafen fährt?"],
    "fr": ["Elle a ouvert la fenêtre et a regardé le jardin, où la pluie s'était enfin arrêtée.",
           "Pouvez-vous me dire quel train va à l'aéroport ?"],
    "es": ["Abrió la ventana y miró el jardín, donde por fin había dejado de llover.",
           "¿Puede decirme qué tren va al aeropuerto?"],
    "it": ["Ha aperto la finestra e ha guardato il giardino, dove la pioggia si era finalmente fermata.",
           "Mi può dire quale treno va all'aeroporto?"],
    "nl": ["Ze deed het raam open en keek naar de tuin, waar de regen eindelijk was opgehouden.",
           "Kunt u mij zeggen welke trein naar het vliegveld gaat?"],
    "pt": ["Ela abriu a janela e olhou para o jardim, onde a chuva tinha finalmente parado.",
           "Pode dizer-me qual é o comboio que vai para o aeroporto?"],
}


@pytest.mark.parametrize("language", langid.LANGUAGES)
def test_short_sentences_of_each_covered_language(language):
    for sentence in SAMPLES[language]:
        guess = langid.identify_language(sentence)
        assert guess.language == language, (sentence, guess)
        assert guess.margin > 0.2 and guess.score > 0.99, (sentence, guess)
        assert sum(guess.scores.values()) == pytest.approx(1.0)


def test_the_default_corpus_is_english():
    docs = [text for text, _ in default_corpus.generate_documents(400, seed=0)]
    guesses = [langid.identify_language(d) for d in docs]
    long_guesses = [g for d, g in zip(docs, guesses) if len(d.split()) >= 20]
    assert len(long_guesses) > 250
    assert all(g.language == "en" for g in long_guesses)
    assert min(g.margin for g in long_guesses) > 0.3            # nats per n-gram over the runner-up
    assert min(g.score for g in long_guesses) > 0.999
    # One-sentence documents of mostly invented words are the only ones that can go astray, and rarely do.
    assert sum(g.language == "en" for g in guesses) >= 0.98 * len(docs)
    whole = langid.identify_language(" ".join(docs[:50]))
    assert whole.language == "en" and whole.margin > 0.5


def test_language_filter_verdicts():
    english = " ".join(SAMPLES["en"])
    verdict = langid.language_filter(english)
    assert verdict.keep and verdict.rule == "language" and verdict.score > 0.99
    french = langid.language_filter(SAMPLES["fr"][0])
    assert not french.keep and french.score < 0.01
    assert french.reason.startswith("language 'fr' (p 1.000) not in ('en',)"), french.reason
    assert langid.language_filter(SAMPLES["fr"][0], langid.LanguageFilterConfig(languages=("en", "fr"))).keep
    empty = langid.language_filter("1234 5678 !!!")
    assert not empty.keep and empty.reason == "language: no letters to identify"
    strict = langid.language_filter("the end", langid.LanguageFilterConfig(min_score=1.0))
    assert not strict.keep and "< min 1" in strict.reason


def test_config_names_what_it_does_not_cover():
    with pytest.raises(ValueError, match=r"languages \('fi',\): the identifier covers only"):
        langid.LanguageFilterConfig(languages=("fi",))
    with pytest.raises(TypeError, match="got the string 'en'"):
        langid.LanguageFilterConfig(languages="en")


def test_training_text_format_errors_name_the_line():
    assert langid.read_training_text("# comment\n== xx ==\nsome text\n\nmore\n") == {"xx": "some text\nmore"}
    with pytest.raises(ValueError, match=r"langid_text.txt:1: text before the first"):
        langid.read_training_text("stray\n== xx ==\n")
    with pytest.raises(ValueError, match=r":3: language 'xx' appears twice"):
        langid.read_training_text("== xx ==\na\n== xx ==\n")


def test_the_shipped_text_covers_exactly_the_listed_languages():
    assert langid.default_model().languages == langid.LANGUAGES


@pytest.mark.parametrize("text", ["", "123 !!", "The cat sat.", "Ça c'est très bien, naïve café 日本語テキスト",
                                  "\n\n".join(t for t, _ in default_corpus.generate_documents(30, seed=3))])
def test_vectorised_ngram_weights_equal_the_counted_ngrams(text):
    model = langid.default_model()
    expected = np.zeros(len(model.index))
    for gram, count in langid.ngram_counts(text).items():
        if gram in model.index:
            expected[model.index[gram]] = count
    np.testing.assert_array_equal(model.ngram_weights(text), expected)
