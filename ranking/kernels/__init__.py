"""The compiled kernels (scoring, per-request row walks) and the public wrappers other layers call."""
