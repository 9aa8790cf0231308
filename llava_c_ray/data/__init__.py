"""LLaVA conversation data: reading, validation, templates, Parquet shards, the built-in benchmark."""
