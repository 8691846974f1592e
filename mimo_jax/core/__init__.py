"""The bottom layer: dtype names (`dtypes`), user-facing errors (`errors`), log output
(`logs`), the import layering (`layering`) and the host allocator setting (`host_memory`),
shared by every layer. Import the submodules: this file imports nothing, so that the entry
points can set up the process (host_memory) before jax loads."""
