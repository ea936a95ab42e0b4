"""Solvers over the kernel store: the tiled Cholesky factorisation (and, later, CG)."""
