# The exact k-means core is a small C file with no Python API (loaded through
# ctypes so that it runs without the GIL); pyproject.toml holds everything else.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "weightshare._kmeans_core",
            sources=["weightshare/_kmeans.c"],
            extra_compile_args=["-O3", "-std=c99"],
        )
    ]
)
