"""The lab's CPU kernels: C sources built into one shared library (library.py) that shares one
worker pool (pool.c) between paged decode attention (paged_decode.c, called through
engine/attention/cpu_kernel.py) and the bf16 decode matmuls (linear_bf16.c, linear.py)."""
