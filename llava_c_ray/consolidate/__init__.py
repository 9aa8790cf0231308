"""Spectral-Aware Consolidation: the pure math (spectral, lowrank) and the streaming Ray engine."""
