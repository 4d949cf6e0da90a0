"""Fused kernels, one module per op and backend. Each registers itself with ``tsbn_kernels.dispatch``."""
