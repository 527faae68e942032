"""Build mole_kernels: one extension, `mole_kernels._C`, from every source in csrc/.

Why setup.py drives torch.utils.cpp_extension (not CMake): it picks the compile
flags, C++ ABI and `-gencode` list that match the installed torch on every
version from 2.4 on, with no CUDA discovery of its own to break on a minimal
toolkit. CMakeLists.txt builds the very same csrc/ files (globbed by the same
rule, so there is no second list) for C++ tooling: compile_commands.json,
clangd, sanitizers.

CUDA is compiled when torch is a CUDA build, a toolkit is found and there are GPU
architectures to compile for (TORCH_CUDA_ARCH_LIST, else the visible GPUs');
otherwise the CPU kernels alone are built and one line says why CUDA was skipped.

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
compiled and what an object usually costs, a heartbeat every 30 s naming the
objects still compiling, the total time) go to stderr, which pip keeps (shown with
-v and when the build fails; each line also ticks pip's "still running..." in a
log), and to the terminal as well when there is one, so a long build shows that
it is alive.
"""
import glob
import json
import os
import shutil
import sys
import threading
import time
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch warns at import when numpy is missing; the build does not use numpy (a runtime dependency
# that pip installs after the build), so pip would only show an alarming line.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
BUILD_INFO = "_build_info.json"  # read by mole_kernels/_build_check.py when the extension cannot load
HEARTBEAT_S = 30
# What one object usually costs, in CPU time, measured on a 2-core VM (tools/measure_setup.sh; the
# README's "What it costs"): said when the build starts, so that a long wait reads as work, not a hang.
TYPICAL_CPU_S = {"c++": "10-30 s", "cuda": "20-60 s per GPU architecture"}


def _log_streams():
    """Where build lines go: stderr always (pip keeps it: shown with -v, in CI logs through -v, and
    when the build fails), and the terminal too when stderr is captured (pip without -v hides it)."""
    streams = [sys.stderr]
    if not sys.stderr.isatty() and not _pip_shows_output():
        try:
            streams.append(open("/dev/tty", "w"))
        except OSError:  # no controlling terminal (CI, a service): stderr only
            pass
    return streams


def _pip_shows_output():
    """Whether the pip that runs this build was given -v (it then prints our stderr itself, and a
    copy on the terminal would show every line twice). pip runs a backend as its direct child."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:  # not Linux, or no such process: assume pip hides the output
        return False
    return any(a == "--verbose" or (a.startswith("-") and not a.startswith("--") and "v" in a) for a in args)


_LOG = _log_streams()


def log(msg):
    for stream in _LOG:
        try:
            print(f"mole_kernels build: {msg}", file=stream, flush=True)
        except OSError:  # a terminal that went away must not fail the build
            pass


def _elapsed(t0):
    s = int(time.monotonic() - t0)
    return f"{s // 60}m{s % 60:02d}s"


def is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home(notes):
    """The real CUDA toolkit root, or None (``notes``: lines for the build log).

    torch guesses dirname(dirname(which nvcc)); a wrapper script such as
    /usr/local/bin/nvcc makes that /usr/local, which has no CUDA headers or
    libraries. Accept only a folder that has both bin/nvcc and the headers.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            if is_toolkit(os.environ[var]):
                return os.environ[var]
            notes.append(f"{var}={os.environ[var]} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h); "
                         "searching")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    return next((c for c in candidates if is_toolkit(c)), None)


def cuda_plan(torch, notes):
    """(cuda_home, arch list, None) when CUDA should be built, else (None, None, reason).

    The architectures: TORCH_CUDA_ARCH_LIST, else the visible GPUs'. With neither, no CUDA: a
    machine with no GPU gets the CPU kernels in a fraction of the time (compiling for GPUs it
    does not have cost a CPU-only user 4x the build); building for another machine (a container
    image, a cluster's build node) names its GPUs' architectures in TORCH_CUDA_ARCH_LIST."""
    if os.environ.get("MOLE_KERNELS_NO_CUDA") == "1":
        return None, None, "MOLE_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return None, None, f"torch {torch.__version__} is not a CUDA build"
    cuda_home = find_cuda_home(notes)
    if cuda_home is None:
        return None, None, "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs = ";".join(f"{a}.{b}" for a, b in caps)
    if not archs:
        return None, None, ("no GPU is visible and TORCH_CUDA_ARCH_LIST is not set (to compile the CUDA kernels "
                            "for another machine's GPUs, set it: e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0')")
    return cuda_home, archs, None


def make_extension():
    """(the extension, torch's cpp_extension module, lines for the build log)."""
    import torch

    notes = []
    cuda_home, archs, why_not = cuda_plan(torch, notes)
    if cuda_home:
        # Must be set before cpp_extension is imported: it resolves CUDA_HOME at import time.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    # Without CUDA, cpp_extension's import would still guess a CUDA_HOME and warn about it
    # ("No CUDA runtime is found, using CUDA_HOME=..."): a line about a toolkit this build does not use.
    with _quiet_logger("torch.utils.cpp_extension", quiet=not cuda_home):
        from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    # No -std flag: cpp_extension picks the standard this torch needs (C++17 up to 2.9, C++20 after).
    # -g0: Python's own CFLAGS ask for debug info, which would double the objects' size and the link time.
    cxx = ["-O3", "-g0", "-fvisibility=hidden", f'-DMOLE_TORCH_VERSION="{torch.__version__}"']
    # at::parallel_for is inlined into our code: without -fopenmp it silently runs on one
    # thread. The soname (libgomp.so.1) resolves to the copy torch already loaded.
    link = []
    if torch._C.has_openmp:
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if cuda_home:
        sources += sorted(glob.glob("csrc/*.cu"))
        notes.append(f"CPU + CUDA kernels (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={archs})")
        defines = ["-DMOLE_WITH_CUDA", f'-DMOLE_CUDA_ARCHS="{archs}"']
        return cpp_extension.CUDAExtension(
            "mole_kernels._C", sources,
            extra_compile_args={"cxx": cxx + defines,
                                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines},
            extra_link_args=link,
        ), cpp_extension, notes
    notes.append(f"CPU kernels only; CUDA skipped: {why_not}")
    # pip hides build output unless -v: build_info() (and `mole-kernels info`) tells the reason too.
    cxx.append(f'-DMOLE_CUDA_SKIPPED="{why_not}"')
    return cpp_extension.CppExtension("mole_kernels._C", sources, extra_compile_args={"cxx": cxx},
                                      extra_link_args=link), cpp_extension, notes


class _quiet_logger:
    """Raises a logger's level to ERROR inside the block (when ``quiet``)."""

    def __init__(self, name, quiet=True):
        import logging

        self.logger, self.quiet, self.level = logging.getLogger(name), quiet, None

    def __enter__(self):
        if self.quiet:
            import logging

            self.level = self.logger.level
            self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        if self.quiet:
            self.logger.setLevel(self.level)


def build_ext_class(cpp_extension, torch_version, notes):
    """torch's BuildExtension, plus progress lines and the build record next to the extension."""

    class BuildExt(cpp_extension.BuildExtension):
        def build_extensions(self):
            # Said here, not where the extension is described: pip runs setup.py once per hook
            # (metadata, then the wheel), and only this step compiles.
            for note in notes:
                log(note)
            sources = [src for ext in self.extensions for src in ext.sources]
            cuda = [src for src in sources if src.endswith(".cu")]
            jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
            log(f"compiling {len(sources)} objects ({len(sources) - len(cuda)} C++"
                + (f", {len(cuda)} CUDA for archs {os.environ['TORCH_CUDA_ARCH_LIST']}" if cuda else "")
                + f") against torch {torch_version}, {jobs} at a time. Typical CPU time per object on a 2-core VM: "
                + f"C++ {TYPICAL_CPU_S['c++']}" + (f", CUDA {TYPICAL_CPU_S['cuda']}" if cuda else ""))
            t0, start, done = time.monotonic(), time.time(), threading.Event()
            objects = {src: os.path.join(self.build_temp, os.path.splitext(src)[0] + ".o") for src in sources}

            def written(obj):
                return os.path.exists(obj) and os.path.getmtime(obj) >= start

            def heartbeat():  # the compilers print nothing for minutes: say the build is alive, and on what
                while not done.wait(HEARTBEAT_S):
                    todo = [os.path.basename(src) for src, obj in objects.items() if not written(obj)]
                    if todo:
                        log(f"{_elapsed(t0)}: {len(sources) - len(todo)} of {len(sources)} objects compiled; "
                            f"to go ({jobs} at a time): {', '.join(todo)}")
                    else:
                        log(f"{_elapsed(t0)}: all {len(sources)} objects compiled; linking mole_kernels/_C")

            threading.Thread(target=heartbeat, daemon=True).start()
            try:
                super().build_extensions()
            finally:
                done.set()
            log(f"compiled and linked in {_elapsed(t0)}")

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

    ext, cpp_extension, notes = make_extension()
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext_class(cpp_extension, torch.__version__, notes)})


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
