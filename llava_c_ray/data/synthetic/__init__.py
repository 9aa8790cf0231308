"""The built-in benchmark: a procedurally drawn world in LLaVA format (SPEC.md §5)."""
