"""Data: sources (text, jsonl, parquet), the embedded default corpus, the sentencepiece tokenizer, packing,
and the grain pipeline that turns `config.data` into batches (`pipeline.build_lm_data`)."""
