"""Exact and MinHash deduplication: planted duplicates found, distinct texts kept, LSH maths, fixed signatures,
and an index that resumes from disk exactly where it stopped."""
import hashlib

import numpy as np
import pytest

from llm_jax.data import default_corpus
from llm_jax.data.prepare import dedup

CONFIG = dedup.MinHashConfig()


@pytest.fixture(scope="module")
def long_docs():
    """40 distinct documents of 150+ words: consecutive default-corpus documents joined until long enough."""
    docs, current = [], []
    for text, _ in default_corpus.generate_documents(1200, seed=11):
        current.append(text)
        if sum(len(t.split()) for t in current) >= 150:
            docs.append("\n\n".join(current))
            current = []
        if len(docs) == 40:
            return docs
    raise AssertionError(f"only {len(docs)} long documents")


def _hashed(elements) -> np.ndarray:
    """Sorted distinct 64-bit blake2b hashes of the given elements, as shingle_hashes makes them (the
    multiply-shift permutations assume hash-like inputs, not runs of small integers)."""
    digests = b"".join(hashlib.blake2b(f"element {e}".encode(), digest_size=8).digest() for e in elements)
    return np.unique(np.frombuffer(digests, dtype="<u8").astype(np.uint64))


def _change_words(text: str, positions, replacement: str = "zzyzx") -> str:
    words = text.split()
    for p in positions:
        words[p] = replacement
    return " ".join(words)


def test_normalisation_variants_are_exact_duplicates():
    variants = ["Hello, World!", "hello world", "  HELLO\n\tworld ", "Ｈｅｌｌｏ　Ｗｏｒｌｄ", "hello — world…"]
    assert {dedup.normalize_text(v) for v in variants} == {"hello world"}
    assert len({dedup.exact_key(v) for v in variants}) == 1
    assert dedup.exact_key("hello world 2") != dedup.exact_key("hello world")
    assert dedup.exact_key("Hello, World!").hex() == "e9a804b2e527fd3601d2ffc0bb023cd6"   # blake2b-128, fixed


def test_exact_index_keeps_the_first_and_round_trips(tmp_path):
    index = dedup.ExactIndex()
    assert index.add("a", "The cat sat.").keep
    assert index.add("b", "A different text.").keep
    again = index.add("c", "the  CAT sat")
    assert not again.keep and again.duplicate_of == "a" and again.similarity == 1.0
    index.save(str(tmp_path / "exact.npz"))
    restored = dedup.ExactIndex.load(str(tmp_path / "exact.npz"))
    assert len(restored) == 2
    assert restored.add("d", "THE CAT SAT!!").duplicate_of == "a"
    assert restored.add("e", "Something new.").keep


def test_minhash_finds_planted_near_duplicates(long_docs):
    index = dedup.MinHashIndex(CONFIG)
    originals = index.add_batch([f"doc{i}" for i in range(len(long_docs))], long_docs)
    assert all(r.keep for r in originals), [r for r in originals if not r.keep]
    planted = {f"near{i}": (f"doc{i}", _change_words(long_docs[i], [20 + i, 90])) for i in range(0, 40, 4)}
    for doc_id, (source, text) in planted.items():
        result = index.add(doc_id, text)
        assert result.duplicate_of == source and result.matched_id == source, result
        assert 0.8 <= result.similarity < 1.0
    assert index.kept_id("near8") == "doc8" and index.kept_id("doc8") == "doc8"
    clusters = index.clusters()
    assert [(c.kept_id, c.removed_ids) for c in clusters] == [(s, (d,)) for d, (s, _) in planted.items()]
    assert all(0.8 <= sim < 1.0 for c in clusters for sim in c.similarities)
    # Distinct documents sharing only the corpus's function words are far apart.
    sigs = np.stack([index.signature(f"doc{i}") for i in range(10)])
    pairwise = [dedup.estimated_jaccard(sigs[i], sigs[j]) for i in range(10) for j in range(i)]
    assert max(pairwise) < 0.1


def test_a_heavily_edited_copy_is_not_a_duplicate(long_docs):
    index = dedup.MinHashIndex(CONFIG)
    index.add("original", long_docs[0])
    rewritten = _change_words(long_docs[0], range(0, 150, 6))          # every sixth word: no 5-gram survives
    assert index.query(rewritten).keep
    assert index.add("rewritten", rewritten).keep


def test_batch_signatures_equal_single_ones_and_are_fixed():
    text = "The quick brown fox jumps over the lazy dog while the farmer sleeps under an old oak tree."
    sig = dedup.minhash_signature(text)
    assert sig.dtype == np.uint32 and sig.shape == (128,)
    # Computed once; any process, platform or numpy version must give the same (no hash() randomisation).
    assert sig[:8].tolist() == [254294132, 67624188, 295559176, 674737849, 162588526, 1112818173, 6647147,
                                140245730]
    a, b = dedup.permutation_coefficients(128, 0)
    assert (int(a[0, 0]), int(b[0, 0])) == (16504301851868979615, 1193508060754136811)
    texts = [text, "", "short text", text.upper() + " and more words at the end of it"]
    hash_sets = [dedup.shingle_hashes(t, 5) for t in texts]
    batch = dedup.minhash_signatures(hash_sets, CONFIG)
    for t, row in zip(texts, batch):
        np.testing.assert_array_equal(row, dedup.minhash_signature(t))
    assert (batch[1] == dedup.EMPTY_SLOT).all()
    assert dedup.shingles("Short text!", 5) == ["short text"]
    assert dedup.shingles("one two three four five six", 5) == ["one two three four five", "two three four five six"]


def test_long_documents_are_signed_in_chunks_with_the_same_result():
    hashes = _hashed(range(50_000))
    whole = dedup.minhash_signatures([hashes], CONFIG)[0]                 # > one chunk: the chunked path
    a, b = dedup.permutation_coefficients(CONFIG.num_perm, CONFIG.seed)
    expected = ((a * hashes[None, :] + b) >> np.uint64(32)).min(axis=1)
    np.testing.assert_array_equal(whole, expected)


def test_batches_larger_than_a_chunk_split_into_groups(monkeypatch, long_docs):
    hash_sets = [dedup.shingle_hashes(t, 5) for t in long_docs[:12]] + [np.zeros(0, np.uint64)]
    whole = dedup.minhash_signatures(hash_sets, CONFIG)
    monkeypatch.setattr(dedup, "_SHINGLE_CHUNK", 300)                     # groups of about two documents
    np.testing.assert_array_equal(dedup.minhash_signatures(hash_sets, CONFIG), whole)


def test_lsh_candidate_probability():
    assert dedup.candidate_probability(0.0, 32, 4) == 0.0
    assert dedup.candidate_probability(1.0, 32, 4) == 1.0
    assert dedup.candidate_probability(0.5, 4, 4) == pytest.approx(1 - (1 - 1 / 16) ** 4)
    s = np.linspace(0, 1, 11)
    assert np.all(np.diff(dedup.candidate_probability(s, 16, 8)) >= 0)
    assert dedup.lsh_threshold(32, 4) == pytest.approx(32 ** -0.25)
    assert dedup.candidate_probability(0.8, 32, 4) > 1 - 1e-7           # the defaults' claim
    assert dedup.candidate_probability(0.3, 32, 4) == pytest.approx(0.23, abs=0.01)

    # Empirically: two sets at Jaccard exactly 0.5 (80 shared of 160), 4 bands of 4 rows, over 400 seeds.
    set_a, set_b = _hashed(range(0, 120)), _hashed(range(40, 160))
    assert dedup.exact_jaccard(set_a, set_b) == 0.5
    hits, agreement = 0, []
    for seed in range(400):
        config = dedup.MinHashConfig(num_perm=16, bands=4, seed=seed)
        sig_a, sig_b = dedup.minhash_signatures([set_a, set_b], config)
        hits += bool((sig_a.reshape(4, 4) == sig_b.reshape(4, 4)).all(axis=1).any())
        agreement.append(dedup.estimated_jaccard(sig_a, sig_b))
    expected = dedup.candidate_probability(0.5, bands=4, rows=4)          # 0.2275; 3 sigma = 0.063
    assert abs(hits / 400 - expected) < 0.063
    assert abs(np.mean(agreement) - 0.5) < 0.03


def _stream(long_docs):
    """60 documents: the 40 originals interleaved with 20 near copies of earlier ones (some copies of copies)."""
    ids, texts = [], []
    for i, text in enumerate(long_docs):
        ids.append(f"doc{i}")
        texts.append(text)
        if i % 2 == 1:
            ids.append(f"copy{i}")
            texts.append(_change_words(long_docs[i - 1], [30]))
    texts[-1] = _change_words(texts[-1], [100])                             # a copy of a copy
    return ids, texts


@pytest.mark.parametrize("exact", [False, True], ids=["estimated", "exact_jaccard"])
def test_index_save_and_restore_resume_identically(long_docs, tmp_path, exact):
    config = dedup.MinHashConfig(exact_jaccard=exact)
    ids, texts = _stream(long_docs)
    uninterrupted = dedup.MinHashIndex(config)
    expected = uninterrupted.add_batch(ids, texts)
    assert sum(not r.keep for r in expected) == 20

    first = dedup.MinHashIndex(config)
    results = first.add_batch(ids[:25], texts[:25])
    first.save(str(tmp_path / "index.npz"))
    resumed = dedup.MinHashIndex.load(str(tmp_path / "index.npz"))
    assert resumed.config == config and len(resumed) == 25
    results += [resumed.add(i, t) for i, t in zip(ids[25:], texts[25:])]
    assert results == expected
    assert resumed.clusters() == uninterrupted.clusters()
    np.testing.assert_array_equal(resumed.signature("doc3"), uninterrupted.signature("doc3"))


def test_a_document_resembling_two_clusters_joins_the_older(tmp_path):
    # Shingle sets: A and B share 100 of 124 (Jaccard 0.81, under the 0.85 threshold); C takes half of each's own
    # part (Jaccard 0.90 with both). A and B are both kept, so C joins A's cluster and the clusters stay apart.
    shared, own_a, own_b = list(range(100)), list(range(1000, 1012)), list(range(2000, 2012))
    sets = {"A": _hashed(shared + own_a), "B": _hashed(shared + own_b), "C": _hashed(shared + own_a[:6] + own_b[:6])}
    config = dedup.MinHashConfig(threshold=0.85, exact_jaccard=True)
    index = dedup.MinHashIndex(config)
    sigs = dedup.minhash_signatures(list(sets.values()), config)
    results = [index.add_signature(doc_id, sig, hashes) for (doc_id, hashes), sig in zip(sets.items(), sigs)]
    assert [r.keep for r in results] == [True, True, False]
    assert results[2].duplicate_of == "A" and results[2].similarity == pytest.approx(106 / 118)
    assert [(c.kept_id, c.removed_ids) for c in index.clusters()] == [("A", ("C",))]
    index.save(str(tmp_path / "exact.npz"))
    assert dedup.MinHashIndex.load(str(tmp_path / "exact.npz")).clusters() == index.clusters()


def test_empty_documents_are_kept_and_never_match():
    index = dedup.MinHashIndex(CONFIG)
    assert index.add("empty1", "").keep
    assert index.add("empty2", "  ...  ").keep
    assert index.add("short1", "Hello there.").keep
    assert index.add("short2", "hello THERE").duplicate_of == "short1"     # a short text is one shingle


def test_errors_name_the_thing():
    with pytest.raises(ValueError, match=r"bands \(30\) must divide num_perm \(128\)"):
        dedup.MinHashConfig(bands=30)
    with pytest.raises(ValueError, match="threshold must be in"):
        dedup.MinHashConfig(threshold=0.0)
    index = dedup.MinHashIndex(CONFIG)
    index.add("x", "some text here")
    with pytest.raises(ValueError, match=r"document id 'x' is already in the index \(position 0\)"):
        index.add("x", "other text")
    with pytest.raises(ValueError, match=r"signature of 'y' has shape \(64,\) and dtype uint32; expected \(128,\)"):
        index.add_signature("y", np.zeros(64, np.uint32))
    with pytest.raises(ValueError, match="got 2 document ids for 1 texts"):
        index.add_batch(["a", "b"], ["only one"])
    with pytest.raises(KeyError, match="'nope' is not in the index"):
        index.kept_id("nope")
