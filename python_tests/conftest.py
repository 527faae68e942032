"""Shared test setup: every test starts from the same seed; CUDA cases are always collected and
skip with their reason where no GPU is visible (so the skip count says what did not run); helpers
for tests that rerun part of the suite in a child process and check how many cases it ran."""
import inspect
import os
import random
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import pytest
import torch

import mole_kernels  # noqa: F401  (an unbuilt or mismatched install fails here once, not in every module)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible)")


def cuda_param(value, id=None):
    """A parametrize value that needs a GPU: collected everywhere, skipped (with the reason) without one."""
    return pytest.param(value, marks=requires_cuda, id=id or str(value))


# Where a lut_gather test puts (table, ids): cpu; cuda (VRAM); zero_copy (pinned table, CUDA ids).
DEVICES = ["cpu", cuda_param("cuda"), cuda_param("zero_copy")]

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances for a float32-accumulated result rounded to the output dtype (half an ulp, with margin).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield


# ---------------------------------------------------------------- child pytest runs --------
# A test marked child_run(args, env) checks a child `python -m pytest ARGS` run with ENV (the
# Triton interpreter, a capped CPU instruction set). The children start right after collection
# and run while this process runs the other tests; the marked test then waits for its child.

def pytest_configure(config):
    config.addinivalue_line("markers", "child_run(args, env={}): the test checks a child pytest run of ARGS with "
                                       "ENV, started right after collection (see conftest.child_result)")
    config.addinivalue_line("markers", "gpu: the case needs a CUDA device (added at collection: `pytest -m gpu` "
                                       "runs exactly the GPU cases, as bench/gpu_check.sh does)")


def _needs_gpu(item) -> bool:
    """A case that skips without CUDA: marked requires_cuda / cuda_param (a skipif naming a CUDA device),
    or parametrized with a GPU backend or device ("cuda", "zero_copy")."""
    if any("CUDA device" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, str) and v in ("cuda", "zero_copy") for v in params.values())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _needs_gpu(item):
            item.add_marker(pytest.mark.gpu)


class _Child:
    def __init__(self, args, env):
        self.dir = tempfile.mkdtemp(prefix="mole_child_")
        self.report = os.path.join(self.dir, "report.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={self.report}", *args]
        # cwd: this folder, so the child imports the same package as this process
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, **env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        self._result = None

    def result(self, timeout=900):
        if self._result is None:
            try:
                out, _ = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.stop()
                raise AssertionError(f"the child pytest run took more than {timeout} s")
            self._result = _counts(self.report, self.proc.returncode, out[-6000:])
            shutil.rmtree(self.dir, ignore_errors=True)
        return self._result

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        shutil.rmtree(self.dir, ignore_errors=True)


def _counts(report, returncode, output):
    """A child's counts from its JUnit report: passed, failed, errors, skipped, collected."""
    if not os.path.exists(report):
        raise AssertionError(f"the child pytest wrote no report (exit code {returncode}):\n{output}")
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return dict(collected=n["tests"], failed=n["failures"], errors=n["errors"], skipped=n["skipped"],
                passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], returncode=returncode, output=output)


_children = {}


def _child_key(mark):
    return tuple(mark.kwargs["args"]), tuple(sorted(mark.kwargs.get("env", {}).items()))


def _start_child(mark):
    key = _child_key(mark)
    if key not in _children:
        _children[key] = _Child(mark.kwargs["args"], mark.kwargs.get("env", {}))
    return _children[key]


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for item in session.items:
        mark = item.get_closest_marker("child_run")
        skipped = any(m.args and m.args[0] is True for m in item.iter_markers("skipif"))
        if mark is not None and not skipped and not item.get_closest_marker("skip"):
            _start_child(mark)
    # A test module may define start_in_background(items): called once with its collected items,
    # so that slow subprocesses (README blocks) run while this process runs the other tests.
    by_module = {}
    for item in session.items:
        by_module.setdefault(item.module, []).append(item)
    for module, items in by_module.items():
        if hasattr(module, "start_in_background"):
            module.start_in_background(items)


def pytest_sessionfinish(session):
    for child in _children.values():
        child.stop()  # children of tests that never ran (-x, -k, Ctrl-C)


def child_result(request):
    """The counts of the child run named by the test's child_run marker (started now if it was not yet)."""
    return _start_child(request.node.get_closest_marker("child_run")).result()


def assert_child_ran(result, expected):
    """Every one of the ``expected`` cases ran and passed: none failed, errored or skipped (a
    collection error or a module skipped as a whole shows here as a wrong count)."""
    got = {k: result[k] for k in ("passed", "failed", "errors", "skipped")}
    assert got == dict(passed=expected, failed=0, errors=0, skipped=0) and result["returncode"] == 0, \
        f"expected {expected} cases to pass, got {got} (exit code {result['returncode']}):\n{result['output']}"


def _param_values(value, n_names):
    """The values one parametrize entry gives its argnames (a pytest.param's, or the entry itself)."""
    if type(value).__name__ == "ParameterSet":
        return tuple(value.values)
    return tuple(value) if n_names > 1 else (value,)


def count_cases(functions, fixed=None):
    """How many cases pytest generates for ``functions`` from their ``@pytest.mark.parametrize``
    marks, keeping only values equal to ``fixed[name]`` for the names in ``fixed`` (e.g.
    ``{"device": "cpu"}``). Counted from the decorators, independently of any child's collection."""
    fixed = fixed or {}
    total = 0
    for fn in functions:
        n = 1
        for mark in getattr(fn, "pytestmark", []):
            if mark.name != "parametrize":
                continue
            names = mark.args[0]
            names = [s.strip() for s in names.split(",")] if isinstance(names, str) else list(names)
            keep = 0
            for v in mark.args[1]:
                vals = _param_values(v, len(names))
                keep += all(vals[names.index(k)] == want for k, want in fixed.items() if k in names)
            n *= keep
        total += n
    return total


def module_tests(module, predicate=lambda fn: True):
    """The test functions of ``module`` (a module's globals) that satisfy ``predicate``."""
    return [fn for name, fn in module.items() if name.startswith("test_") and inspect.isfunction(fn) and predicate(fn)]


def uses_fixture(name):
    return lambda fn: name in inspect.signature(fn).parameters


# ---------------------------------------------------------------- CPU instruction sets ------

_ISA_ORDER = ["scalar", "avx2", "avx512"]


def expected_cpu_isa(cap=None):
    """(lut_gather's ISA, lut_gather_quant's ISA) this CPU should run under the cap
    MOLE_KERNELS_CPU_ISA=cap, from /proc/cpuinfo (not from the extension); both follow the same rule.
    None when the CPU's flags cannot be read here."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return "scalar", "scalar"
    if not os.path.exists("/proc/cpuinfo"):
        return None
    with open("/proc/cpuinfo") as f:
        flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    avx2 = {"avx2", "fma", "f16c"} <= flags
    best = "avx512" if avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else \
        "avx2" if avx2 else "scalar"
    if cap in _ISA_ORDER:
        best = _ISA_ORDER[min(_ISA_ORDER.index(best), _ISA_ORDER.index(cap))]
    return best, best
