"""Build for one2one: the Cython scoring core and the gRPC stubs.

The stubs are generated from ``proto/`` at build time and never committed; the
Cython compiler directives are set once here (``ONE2ONE_CYTHON_DEBUG=1`` turns
bounds checking back on for a debug build).
"""

import os
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
DEBUG = os.environ.get("ONE2ONE_CYTHON_DEBUG", "") not in ("", "0")


def generate_stubs():
    """Run protoc over every .proto under proto/, writing *_pb2 next to it."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    for proto in protos:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={PROTO_ROOT}",
                f"--pyi_out={PROTO_ROOT}",
                f"--grpc_python_out={PROTO_ROOT}",
                proto,
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {rc})")


class BuildPyWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": not DEBUG,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}


def _kernel(name: str, package: str = "ranking.kernels") -> Extension:
    """A compiled module of ``package`` (ranking/kernels/ by default) built from its .pyx, with the shared flags."""
    return Extension(
        f"{package}.{name}",
        [f"{package.replace('.', '/')}/{name}.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"] if not DEBUG else ["-O0", "-g"],
        language="c++",
    )


extensions = [
    _kernel("_scoring"),
    _kernel("_rows"),
    _kernel("_features"),
    _kernel("_search"),
    _kernel("_metric_values", "server"),
]

# Metadata, dependencies and packages are in pyproject.toml; only what must be code is here.
setup(
    # Debug and release C++ live apart: cythonize regenerates only when the .pyx
    # changes, not when the directives do.
    ext_modules=cythonize(
        extensions, compiler_directives=directives, build_dir="build/cython-debug" if DEBUG else "build/cython"
    ),
    cmdclass={"build_py": BuildPyWithStubs},
)
