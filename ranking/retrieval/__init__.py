"""Candidate retrieval: the exact head and the ANN index, and the micro-batcher in front of them."""
