"""Build of the dhsa._core extension: the C core in csrc/ linked to OpenBLAS.

OpenBLAS comes from the scipy-openblas32 wheel (its symbols carry a
``scipy_`` prefix), so ``pip install .`` needs nothing but pip. Set
DHSA_WERROR=1 to turn warnings into errors (CI does).
"""
import glob
import os
import sys

import numpy
import scipy_openblas32
from setuptools import Extension, setup

sources = sorted(glob.glob(os.path.join("csrc", "*.c")))
compile_args = ["-O3", "-std=c11", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter",
                "-fno-strict-aliasing"]
if os.environ.get("DHSA_WERROR") == "1":
    compile_args.append("-Werror")
if os.environ.get("DHSA_SANITIZE") == "1":
    compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
link_args = ["-fopenmp"]
if os.environ.get("DHSA_SANITIZE") == "1":
    link_args += ["-fsanitize=address,undefined"]

core = Extension(
    "dhsa._core",
    sources=sources,
    depends=glob.glob(os.path.join("csrc", "*.h")),
    include_dirs=["csrc", numpy.get_include(), scipy_openblas32.get_include_dir()],
    library_dirs=[scipy_openblas32.get_lib_dir()],
    libraries=[scipy_openblas32.get_library()],
    # installed next to each other in site-packages; dhsa/_loader.py also
    # preloads the library (found through scipy_openblas32's location), which
    # editable installs need
    runtime_library_dirs=["$ORIGIN/../scipy_openblas32/lib"],
    define_macros=[("DHSA_BLAS_PREFIX_SCIPY", "1"), ("_GNU_SOURCE", "1")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

if sys.platform != "linux":
    core.runtime_library_dirs = []

setup(ext_modules=[core])
