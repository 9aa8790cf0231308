"""Searching the consolidation strength α with Ray Tune (SPEC.md §2.2; the paper's Figure 4)."""
