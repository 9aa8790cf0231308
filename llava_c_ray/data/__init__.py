"""LLaVA conversation data: reading, validation, templates, answer scoring, Parquet shards, the built-in benchmark."""
