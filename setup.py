# The exact k-means core, the HashedNets kernels and the codebook GEMM are small C files with no
# Python API (loaded through ctypes so that they run without the GIL); pyproject.toml holds everything else.
# No -march flags: the codebook kernel picks AVX-512 / AVX2 / portable code at run time (users' CPUs differ).
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NO_COMPILER = ("weightshare needs a C compiler (gcc or clang) to build {name} ({source})\n"
               "  install one (Debian/Ubuntu: apt install gcc; macOS: xcode-select --install) and reinstall")


class BuildExt(build_ext):
    """A failed build says what is missing in one message; the codebook kernel is optional (without it packed
    layers run on a pure-torch path, and weightshare logs why once)."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, DistutilsExecError, a missing compiler binary
            if ext.name.endswith("_codebook_core"):
                print(f"warning: the native codebook kernel was not built ({type(exc).__name__}: {exc}); "
                      "packed models will run on the slower pure-torch path")
                return
            raise SystemExit(NO_COMPILER.format(name=ext.name, source=ext.sources[0])) from None


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "weightshare._kmeans_core",
            sources=["weightshare/_kmeans.c"],
            extra_compile_args=["-O3", "-std=c99", "-pthread"],
            extra_link_args=["-pthread"],
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
    ],
)
