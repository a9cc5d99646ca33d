"""Build script: cythonizes ``cython_src/`` into extension modules inside ``lossympi``.

Metadata lives in ``pyproject.toml``; this file only declares the compiled extensions.
"""

from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
SRC = HERE / "cython_src"

extensions = [
    Extension(
        "lossympi._core",
        sources=[str((SRC / "_core.pyx").relative_to(HERE))],
        include_dirs=[str(SRC.relative_to(HERE)), np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("_GNU_SOURCE", "1")],
        extra_compile_args=["-O3", "-fno-strict-aliasing", "-Wno-unused-function"],
    ),
    Extension(
        "lossympi._nfqueue",
        sources=[str((SRC / "_nfqueue.pyx").relative_to(HERE))],
        include_dirs=[str(SRC.relative_to(HERE))],
        define_macros=[("_GNU_SOURCE", "1")],
        extra_compile_args=["-O3", "-Wno-unused-function"],
    ),
    Extension(  # aggregathor's pairwise distances (portable -O3; ag_pairdist.h adds AVX2/AVX-512 clones on x86)
        "aggregathor.gars._pairdist",
        sources=[str((SRC / "_pairdist.pyx").relative_to(HERE))],
        include_dirs=[str(SRC.relative_to(HERE))],
        extra_compile_args=["-O3", "-fno-strict-aliasing", "-Wno-unused-function"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
