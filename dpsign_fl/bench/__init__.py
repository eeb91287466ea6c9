"""Benchmarks of the client step, the vote and the round (measurement code, not part of a release)."""
