"""Benchmarks and load generators that print figures (not tests)."""
