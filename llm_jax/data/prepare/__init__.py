"""Document-level building blocks of data preparation: each takes one document (or one at a time, in stream order)
and returns a decision a report can count, histogram and quote.

    heuristics.py  Gopher quality and repetition rules, C4's terminal-punctuation rule, a keyword blocklist
    langid.py      a small character n-gram language identifier for coarse filtering (seven European languages)
    dedup.py       exact duplicates (hash of normalised text) and near duplicates (MinHash + LSH, incremental)
    privacy.py     e-mail addresses, phone numbers and IP addresses: scrubbed to placeholders, or the document dropped
    classifier*.py a fastText-style linear classifier over hashed n-grams (quality, toxicity): features, the model
                   file and NumPy scoring, JAX/optax training, metrics, and the generated example documents

and the commands built from them, `llm-jax prepare` (prepare_stage.py) and `llm-jax classifier` (classifier_stage.py),
with what prepare uses besides:

    inputs.py      the input files and their documents (read by llm_jax/data/sources.py), each with its file and
                   line; bad records and unreadable files skipped or fatal (on_error)
    steps.py       the configured chain of steps, checked and built from the config's sections
    shards.py      the output shards: cleaned jsonl and parquet, tokenized numpy arrays
    report.py      per-step counts, examples of what was dropped, score histograms; report.json and report.md

Everything is deterministic and holds no global state besides read-only caches of derived tables.
"""
