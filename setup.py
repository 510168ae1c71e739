"""Build the one native extension, ``kvbm._native``, with CMake.

Environment switches (read here and passed to CMake, nowhere else):
  KVBM_CUDA=AUTO|ON|OFF   AUTO compiles the CUDA kernels when nvcc is found; ON fails without it.
  KVBM_UCX=AUTO|ON|OFF    the UCX transfer engine (needs UCX headers: the libucx wheel's, found via
                          `import libucx`, or those under KVBM_UCX_ROOT; libucp is loaded at run time).
  KVBM_UCX_ROOT           a UCX prefix (or the libucx package dir) holding include/ucp/api/ucp.h.
  KVBM_SANITIZE=1         AddressSanitizer + UBSan build (tests run it with LD_PRELOAD=libasan).
  KVBM_BUILD_TYPE=Release|Debug|RelWithDebInfo
  KVBM_CUDA_ARCHS         CMAKE_CUDA_ARCHITECTURES (default 90: H100/H200).
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("KVBM_BUILD_TYPE", "Release")
        sanitize = os.environ.get("KVBM_SANITIZE", "0")
        build_dir = Path(self.build_temp).resolve() / f"cmake-{build_type}-san{sanitize}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DKVBM_CUDA={os.environ.get('KVBM_CUDA', 'AUTO').upper()}",
            f"-DKVBM_UCX={os.environ.get('KVBM_UCX', 'AUTO').upper()}",
            f"-DKVBM_SANITIZE={'ON' if sanitize not in ('', '0') else 'OFF'}",
        ]
        if os.environ.get("KVBM_UCX_ROOT"):
            args.append(f"-DKVBM_UCX_ROOT={os.environ['KVBM_UCX_ROOT']}")
        if os.environ.get("KVBM_CUDA_ARCHS"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['KVBM_CUDA_ARCHS']}")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("kvbm._native")], cmdclass={"build_ext": CMakeBuild})
