"""Model building, loading and checkpoint I/O."""
