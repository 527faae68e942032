"""Build mole_kernels: one extension, `mole_kernels._C`, from every source in csrc/.

Why setup.py drives torch.utils.cpp_extension (not CMake): it picks the compile
flags, C++ ABI and `-gencode` list that match the installed torch on every
version from 2.4 on, with no CUDA discovery of its own to break on a minimal
toolkit. CMakeLists.txt builds the very same csrc/ files (globbed by the same
rule, so there is no second list) for C++ tooling: compile_commands.json,
clangd, sanitizers.

CUDA is compiled when torch is a CUDA build and a toolkit is found; otherwise
the CPU kernels alone are built and one line says why CUDA was skipped.

Which torch the extension is compiled against: torch's C++ ABI changes with every
release, so the extension only loads under the torch it was compiled with.
`pip install .` therefore goes through build_backend.py (pyproject's in-tree
PEP 517 backend, a thin layer over setuptools.build_meta): when the environment
being installed into already has torch, the build uses that torch instead of
downloading the newest one into pip's isolated build environment; when it has
none, `torch>=2.4` is installed there as usual and pip installs the same release
to run it. Each build records its torch version next to the extension
(mole_kernels/_build_info.json), so that a later torch upgrade or downgrade makes
`import mole_kernels` say which torch the extension needs and the command that
rebuilds it (mole_kernels/_build_check.py), instead of a bare loader error.

pip shows a build's output only with -v: the few progress lines below (what is
compiled, a heartbeat every 30 s, the total time) go to the terminal directly
when stderr is captured, so a five-minute CUDA build shows that it is alive.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Recent architectures built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible;
# those nvcc does not know are dropped, the newest also gets PTX for future GPUs.
DEFAULT_ARCHS = ["8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]


# torch warns at import when numpy is missing; the build does not use numpy (a runtime dependency
# that pip installs after the build), so pip would only show an alarming line.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
BUILD_INFO = "_build_info.json"  # read by mole_kernels/_build_check.py when the extension cannot load
HEARTBEAT_S = 30


def _log_stream():
    """stderr, or the terminal when stderr is captured (pip hides a build's output unless -v)."""
    if not sys.stderr.isatty():
        try:
            return open("/dev/tty", "w")
        except OSError:  # no controlling terminal (CI, a service): stderr it is
            pass
    return sys.stderr


_LOG = _log_stream()


def log(msg):
    print(f"mole_kernels build: {msg}", file=_LOG, flush=True)


def _elapsed(t0):
    s = int(time.monotonic() - t0)
    return f"{s // 60}m{s % 60:02d}s"


def is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The real CUDA toolkit root, or None.

    torch guesses dirname(dirname(which nvcc)); a wrapper script such as
    /usr/local/bin/nvcc makes that /usr/local, which has no CUDA headers or
    libraries. Accept only a folder that has both bin/nvcc and the headers.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            if is_toolkit(os.environ[var]):
                return os.environ[var]
            log(f"{var}={os.environ[var]} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h); searching")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    return next((c for c in candidates if is_toolkit(c)), None)


def nvcc_archs(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {f"{int(a[8:]) // 10}.{int(a[8:]) % 10}" for a in out.split() if a.startswith("compute_")}


def choose_arch_list(torch, cuda_home):
    """Honour TORCH_CUDA_ARCH_LIST; else the visible GPUs; else a recent default list."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    known = nvcc_archs(cuda_home)
    archs = [a for a in DEFAULT_ARCHS if known is None or a in known]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def cuda_plan(torch):
    """(cuda_home, None) when CUDA should be built, else (None, reason)."""
    if os.environ.get("MOLE_KERNELS_NO_CUDA") == "1":
        return None, "MOLE_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return None, "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    return cuda_home, None


def make_extension():
    import torch

    cuda_home, why_not = cuda_plan(torch)
    if cuda_home:
        # Must be set before cpp_extension is imported: it resolves CUDA_HOME at import time.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = choose_arch_list(torch, cuda_home)
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    # No -std flag: cpp_extension picks the standard this torch needs (C++17 up to 2.9, C++20 after).
    cxx = ["-O3", "-fvisibility=hidden", f'-DMOLE_TORCH_VERSION="{torch.__version__}"']
    # at::parallel_for is inlined into our code: without -fopenmp it silently runs on one
    # thread. The soname (libgomp.so.1) resolves to the copy torch already loaded.
    link = []
    if torch._C.has_openmp:
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if cuda_home:
        sources += sorted(glob.glob("csrc/*.cu"))
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        log(f"building CPU + CUDA kernels (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={archs})")
        defines = ["-DMOLE_WITH_CUDA", f'-DMOLE_CUDA_ARCHS="{archs}"']
        return cpp_extension.CUDAExtension(
            "mole_kernels._C", sources,
            extra_compile_args={"cxx": cxx + defines,
                                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines},
            extra_link_args=link,
        ), cpp_extension
    log(f"CUDA skipped: {why_not}; building the CPU kernels only")
    # pip hides build output unless -v: build_info() (and `mole-kernels info`) tells the reason too.
    cxx.append(f'-DMOLE_CUDA_SKIPPED="{why_not}"')
    return cpp_extension.CppExtension("mole_kernels._C", sources, extra_compile_args={"cxx": cxx},
                                      extra_link_args=link), cpp_extension


def build_ext_class(cpp_extension, torch_version):
    """torch's BuildExtension, plus progress lines and the build record next to the extension."""

    class BuildExt(cpp_extension.BuildExtension):
        def build_extensions(self):
            sources = [src for ext in self.extensions for src in ext.sources]
            cuda = sum(src.endswith(".cu") for src in sources)
            log(f"compiling {len(sources)} sources ({cuda} CUDA) against torch {torch_version}"
                + (f" for CUDA archs {os.environ['TORCH_CUDA_ARCH_LIST']}" if cuda else ""))
            t0, start, done = time.monotonic(), time.time(), threading.Event()

            def heartbeat():  # ninja prints nothing while nvcc works for minutes: say the build is alive
                while not done.wait(HEARTBEAT_S):
                    written = sum(os.path.getmtime(p) >= start
                                  for p in glob.glob(os.path.join(self.build_temp, "**", "*.o"), recursive=True))
                    log(f"still compiling: {written} of {len(sources)} objects written, {_elapsed(t0)} elapsed")

            threading.Thread(target=heartbeat, daemon=True).start()
            try:
                super().build_extensions()
            finally:
                done.set()
            log(f"compiled in {_elapsed(t0)}")

        def build_extension(self, ext):
            super().build_extension(ext)
            with open(self._build_info_paths(ext)[0], "w", encoding="utf-8") as f:
                json.dump({"torch": torch_version, "source": ROOT}, f)

        def copy_extensions_to_source(self):  # --inplace builds and editable installs
            super().copy_extensions_to_source()
            for ext in self.extensions:
                self.copy_file(*self._build_info_paths(ext), level=self.verbose)

        def _build_info_paths(self, ext):
            """The build record next to the extension: (in build_lib, in the source tree)."""
            inplace, regular = self._get_inplace_equivalent(self.get_finalized_command("build_py"), ext)
            return tuple(os.path.join(os.path.dirname(p), BUILD_INFO) for p in (regular, inplace))

    return BuildExt.with_options(use_ninja=True)


def main():
    import torch

    ext, cpp_extension = make_extension()
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext_class(cpp_extension, torch.__version__)})


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
