"""Builds the C++ extension hosl._C; the package metadata lives in pyproject.toml."""

import glob
import os

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

# Numerics: the noise kernels promise the same bits as the torch and Triton backends, which needs
# every float operation rounded on its own (no FMA contraction, no fast-math reassociation).
NUMERIC_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
# sqrt without errno has no branch, so the Box-Muller loop vectorises; the value is the same.
NUMERIC_FLAGS += ["-fno-math-errno"]

ParallelCompile("HOSL_BUILD_JOBS", default=0).install()

ext_modules = [
    Pybind11Extension(
        "hosl._C",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=NUMERIC_FLAGS + os.environ.get("HOSL_CXXFLAGS", "").split(),
        extra_link_args=["-pthread"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
