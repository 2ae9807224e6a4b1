"""Kernel IR and the Numba CPU / Numba CUDA backends that print it."""
