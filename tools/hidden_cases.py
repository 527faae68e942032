#!/usr/bin/env python
"""Are GPU test cases hidden on a CPU machine? Collects the tests twice, once as they are and once
with CUDA faked available (two devices), and compares the counts. Every GPU case must be collected
everywhere and skip with its reason where it cannot run (conftest.cuda_param / requires_cuda), so
the two counts must be equal; the cases only the faked run collects are listed.

    python tools/hidden_cases.py [TEST_PATHS...]      # default: python_tests

Run it from the repository root with the extension built in place. Exit status 1 when cases hide.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import sys, torch, pytest
if sys.argv[1] == "fake":
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 2
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


def collect(mode, paths):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", CHILD, mode, *paths], cwd=ROOT, env=env, capture_output=True,
                         text=True).stdout
    return {line for line in out.splitlines() if "::" in line}


def main(argv):
    paths = argv or ["python_tests"]
    real, fake = collect("real", paths), collect("fake", paths)
    hidden = sorted(fake - real)
    print(f"collected: {len(real)} here, {len(fake)} with CUDA faked available")
    for nodeid in hidden:
        print(f"  hidden here: {nodeid}")
    return 1 if hidden or not real else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
