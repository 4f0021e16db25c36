"""Data: sources (text, jsonl, parquet, prepared workdirs), the embedded corpora, the sentencepiece tokenizer,
packing, mixtures, and the grain pipeline that turns `config.data` into batches (`mixture.build_lm_data`)."""
