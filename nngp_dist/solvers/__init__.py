"""Solvers over the kernel store.

- :mod:`.tiles`: the tile mathematics (potrf, trsm, update), pure array functions;
- :mod:`.cholesky`: the tiled Cholesky factorisation of ``K + s I`` as a Dask graph of tasks
  that read and write the store's tiles;
- :mod:`.factor`: the stored factor behind a small interface (forward and backward solves,
  solve, log-determinant);
- :mod:`.cg`: preconditioned conjugate gradients, which see the matrix through a ``matvec``.
"""
