"""Builds the CPU extension ``fastrlhf._C`` from ``csrc/``.

Install with ``pip install --no-build-isolation -e .`` so that the extension is compiled against the
torch already installed (an isolated build would fetch a second torch and may mismatch its ABI).
"""

import glob
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# AVX2 + FMA: every x86 server of the last decade has them, and the vocab loops need them.
ARCH_FLAGS = ["-march=x86-64-v3"] if platform.machine() in ("x86_64", "AMD64") else []

setup(
    ext_modules=[
        CppExtension(
            "fastrlhf._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17", *ARCH_FLAGS],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
