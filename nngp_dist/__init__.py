"""nngp_dist: exact infinite-width network kernels, computed in tiles by Dask into Zarr."""
