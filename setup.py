# The exact k-means core and the HashedNets kernels are small C files with no Python API
# (loaded through ctypes so that they run without the GIL); pyproject.toml holds everything else.
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
    ]
)
