# The exact k-means core, the HashedNets kernels and the codebook GEMM are small C files with no
# Python API (loaded through ctypes so that they run without the GIL); pyproject.toml holds everything else.
# No -march flags: the codebook kernel picks AVX-512 / AVX2 / portable code at run time (users' CPUs differ).
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "weightshare._kmeans_core",
            sources=["weightshare/_kmeans.c"],
            extra_compile_args=["-O3", "-std=c99"],
        ),
        Extension(  # HashedNets: weights expanded from their buckets with the hash recomputed, never stored
            "weightshare._hash_core",
            sources=["weightshare/_hash.c"],
            extra_compile_args=["-O3", "-std=c99"],
        ),
        Extension(  # y = x·Wᵀ + b from codebook indices and tables; SIMD variants per function, chosen at run time
            "weightshare.kernels._codebook_core",
            sources=["weightshare/kernels/_codebook.c"],
            extra_compile_args=["-O3", "-std=gnu11"],
            extra_link_args=["-pthread"],
        ),
    ]
)
