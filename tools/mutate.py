#!/usr/bin/env python
"""Mutation check: do the tests fail when the code is wrong?

Applies each mutant of a curated list (a plausible one-line bug: an off-by-one mask, a wrong
stride, a dropped max-subtraction, a chunk loop that stops early, a swapped ISA cap, ...) to a
copy of the project, runs the tests that should catch it, and prints which mutants the tests
kill, by which test, and the kill rate. The goal is 100 %: every mutant not marked equivalent
is killed.

Run from a checkout whose extension is built in place (``python setup.py build_ext --inplace``),
with the test requirements installed::

    python tools/mutate.py                  # everything: Python/Triton mutants, then C++ ones
    python tools/mutate.py --python-only    # no C++ mutants: no rebuilds (~5 min on 2 cores)
    python tools/mutate.py --only combine-e-chunk-loop,softmax-program-offset
    python tools/mutate.py --list           # the mutants, without running anything
    python tools/mutate.py --tests OTHER/python_tests   # judge another version of the tests

Python/Triton mutants run against the copied in-place build. Each C++ mutant rebuilds the copy
(CPU only, ``MAX_JOBS`` honoured, default 1): the first build compiles everything (~1.5 min on 2
cores), later ones only the mutated file (~40 s), so the C++ list is kept short. Triton kernel
mutants run the ``interpret`` cases under ``TRITON_INTERPRET=1``. Before the mutants, each test
selection runs once on the unmutated copy and must pass (``--no-baseline`` skips that).

A mutant counts as killed when its tests fail, error, crash or time out. Exit status: 0 when
every non-equivalent mutant was killed, 1 otherwise (2 for a setup error).

Adding a mutant: append ``Mutant(...)`` to MUTANTS with the file, the exact original snippet,
its replacement, the pytest arguments that should catch it (relative to the repository root; a
``-k`` keeps it fast), an environment when needed, and a note naming the bug. The snippet must
occur exactly once in the file: a mutant that no longer applies (the code changed) is an error,
not a silent pass. A mutant that cannot change any result gets ``equivalent="why"``: it is
still run and reported, but not counted.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRET = {"TRITON_INTERPRET": "1"}


@dataclass
class Mutant:
    id: str
    file: str  # relative to the repository root
    original: str  # occurs exactly once in `file`
    replacement: str
    tests: List[str]  # pytest arguments, paths relative to the repository root
    note: str
    env: Dict[str, str] = field(default_factory=dict)
    equivalent: Optional[str] = None  # why it cannot change a result (not counted)

    @property
    def cpp(self) -> bool:
        return self.file.startswith("csrc/")


def _combine_interp(k):  # the Triton kernels, on CPU tensors under the interpreter
    return ["python_tests/test_combine.py", "-k", f"interpret and not subprocess and ({k})"]


COMBINE_FALLBACK = ["python_tests/test_combine.py", "-k", "torch or bad or experts"]
QUANT = ["python_tests/test_quant.py", "-k", "not scalar_cpu_path"]
GATHER = ["python_tests/test_lut_gather.py", "-k", "not instruction"]

MUTANTS = [
    # ---- Triton kernels (mole_kernels/combine.py), run by the interpreter ----------------------
    Mutant("softmax-no-max-subtraction", "mole_kernels/combine.py",
           "p = tl.exp(x - m[:, None])", "p = tl.exp(x)",
           _combine_interp("softmax"), "router_softmax overflows without the max subtraction", INTERPRET),
    Mutant("softmax-program-offset", "mole_kernels/combine.py",
           "t = tl.program_id(0).to(tl.int64) * BLOCK_T +", "t = tl.program_id(0).to(tl.int64) * BLOCK_E +",
           _combine_interp("softmax"), "softmax tiling: programs > 0 start at the wrong token (BLOCK_E for BLOCK_T)",
           INTERPRET),
    Mutant("softmax-padding-expert", "mole_kernels/combine.py",
           "emask = e < E\n", "emask = e <= E\n",
           _combine_interp("softmax"), "softmax mask off by one: a padding expert joins the softmax", INTERPRET),
    Mutant("combine-e-chunk-loop", "mole_kernels/combine.py",
           "for e0 in range(0, E, E_CHUNK):", "for e0 in range(0, E_CHUNK, E_CHUNK):",
           _combine_interp("combine"), "mole_combine sums the first E_CHUNK experts only", INTERPRET),
    Mutant("combine-e-chunk-offset", "mole_kernels/combine.py",
           "ec = e0 + tl.arange(0, E_CHUNK)", "ec = tl.arange(0, E_CHUNK)",
           _combine_interp("combine"), "every E chunk re-reads chunk 0", INTERPRET),
    Mutant("combine-max-is-min", "mole_kernels/combine.py",
           "m = tl.max(x, axis=0)", "m = tl.min(x, axis=0)",
           _combine_interp("combine"), "mole_combine's softmax shifted by the min: overflow", INTERPRET),
    Mutant("combine-padding-logit-zero", "mole_kernels/combine.py",
           "xc = tl.load(logits_ptr + t * s_lt + ec * s_le, mask=emask, other=float(\"-inf\"))",
           "xc = tl.load(logits_ptr + t * s_lt + ec * s_le, mask=emask, other=0.0)",
           _combine_interp("combine"), "padding experts get logit 0, not -inf (exp(0 - m) overflows for m << 0)",
           INTERPRET),
    Mutant("combine-residual-stride", "mole_kernels/combine.py",
           "res_ptr + t * s_rest + d * s_resd", "res_ptr + t * s_rest + d * s_shd",
           _combine_interp("combine"), "residual read with shared's D stride", INTERPRET),
    Mutant("combine-rows-d-stride", "mole_kernels/combine.py",
           "d[None, :] * s_rd,", "d[None, :],",
           _combine_interp("combine"), "rows assumed contiguous along D", INTERPRET),
    Mutant("combine-d-mask", "mole_kernels/combine.py",
           "dmask = d < D\n", "dmask = d <= D\n",
           _combine_interp("non_contiguous"), "D mask off by one: one element past each row is written", INTERPRET),
    # ---- the torch fallback and the checks (mole_kernels/combine.py) ---------------------------
    Mutant("fallback-chunk-weights", "mole_kernels/combine.py",
           "acc3[t0 : t0 + step].baddbmm_(w[t0 : t0 + step],", "acc3[t0 : t0 + step].baddbmm_(w[:step],",
           COMBINE_FALLBACK, "torch fallback: every token chunk uses the first chunk's weights"),
    Mutant("fallback-shared-dropped", "mole_kernels/combine.py",
           "            acc.add_(sh2)\n", "            pass\n",
           COMBINE_FALLBACK, "torch fallback drops `shared` when a residual is given"),
    Mutant("fallback-softmax-dim", "mole_kernels/combine.py",
           "w = torch.softmax(logits2, dim=-1, dtype=torch.float32).unsqueeze(1)",
           "w = torch.softmax(logits2, dim=0, dtype=torch.float32).unsqueeze(1)",
           COMBINE_FALLBACK, "softmax over tokens instead of experts"),
    Mutant("max-experts-off-by-one", "mole_kernels/combine.py",
           "if not 1 <= E <= MAX_EXPERTS:", "if not 1 <= E < MAX_EXPERTS:",
           COMBINE_FALLBACK, "the documented E limit itself is refused"),
    # ---- quantization (mole_kernels/quant.py) --------------------------------------------------
    Mutant("nf4-nibble-order-encode", "mole_kernels/quant.py",
           "return codes[..., 0::2] | (codes[..., 1::2] << 4), amax.squeeze(-1)",
           "return (codes[..., 0::2] << 4) | codes[..., 1::2], amax.squeeze(-1)",
           QUANT, "nf4 packs element 2k in the high nibble"),
    Mutant("nf4-nibble-order-decode", "mole_kernels/quant.py",
           "codes = torch.stack((p & 15, p >> 4), -1)", "codes = torch.stack((p >> 4, p & 15), -1)",
           QUANT, "dequantize reads the nibbles the wrong way round"),
    Mutant("nf4-floor-not-nearest", "mole_kernels/quant.py",
           "torch.bucketize(xn, (levels[1:] + levels[:-1]) / 2)", "torch.bucketize(xn, levels[1:])",
           QUANT, "nf4 rounds down to a level instead of to the nearest"),
    Mutant("int8-scale-128", "mole_kernels/quant.py",
           "s = _scale(amax, 127.0, fmt)", "s = _scale(amax, 128.0, fmt)",
           QUANT, "int8 scale off by one code: the largest value clips"),
    Mutant("fp8-scale", "mole_kernels/quant.py",
           "s = _scale(amax, _FP8_MAX, fmt)", "s = _scale(amax, 256.0, fmt)",
           QUANT, "fp8 scale uses a wrong maximum"),
    Mutant("row-layout-scale-alignment", "mole_kernels/quant.py",
           "scale_offset = -(-payload // 4) * 4", "scale_offset = payload",
           QUANT, "scales not 4-byte aligned: Python and C++ disagree on the row layout"),
    # ---- the wrappers (mole_kernels/lut_gather.py, _ops.py) -----------------------------------
    Mutant("accumulate-check-dropped", "mole_kernels/lut_gather.py",
           "if accumulate and out is None:", "if False:",
           GATHER, "accumulate=True without out= is silently ignored"),
    Mutant("faults-out-dtype", "mole_kernels/lut_gather.py",
           "out = ids.new_empty(gather_shape(lut, ids, weights, layer, layer_end=layer_end), dtype=lut.dtype)",
           "out = ids.new_empty(gather_shape(lut, ids, weights, layer, layer_end=layer_end), dtype=torch.float32)",
           GATHER, "with faults=, the result is allocated float32 whatever the table's dtype"),
    Mutant("fake-shape-3d", "mole_kernels/_ops.py",
           "if layer is not None or lut.dim() == 3:", "if layer is not None:",
           GATHER, "the shape of a [V, E, D] table's rows is computed as if it had layers"),
    Mutant("fake-shape-fused", "mole_kernels/_ops.py",
           "        return (*ids.shape, D)\n", "        return (*ids.shape, E, D)\n",
           GATHER, "the fused form's fake/result shape keeps the expert dim"),
    # ---- the decode path: lut_combine's table-reading Triton form, prefetch groups, the reader ----
    Mutant("lut-combine-bad-id-reads-row-0", "mole_kernels/combine.py",
           "dmask_rows = dmask & ok", "dmask_rows = dmask",
           ["python_tests/test_lut_combine.py", "-k", "interpret and bad_ids"],
           "an id outside the table reads row 0 instead of nothing", INTERPRET),
    Mutant("lut-combine-row-of-token-not-id", "mole_kernels/combine.py",
           "row_base = rows_ptr + tok * s_rt", "row_base = rows_ptr + t * s_rt",
           ["python_tests/test_lut_combine.py", "-k", "interpret and matches_float64 and V50"],
           "the GATHER form reads the t-th table row instead of row ids[t]", INTERPRET),
    Mutant("prefetch-groups-overlap", "mole_kernels/table/prefetch.py",
           "b = min(L, a + max(1, a))", "b = min(L, a + max(1, a) + 1)",
           ["python_tests/test_decode_path.py", "-k", "layer_groups"],
           "prefetch groups grow too fast: a layer waits for rows it does not need"),
    Mutant("reader-staged-ids-not-inverse", "mole_kernels/table/reader.py",
           "return self._staged_table, inverse", "return self._staged_table, ids",
           ["python_tests/test_decode_path.py", "-k", "reader_combines"],
           "a disk step reads staging rows at the token ids instead of their positions among the unique rows"),
    # ---- C++ (each rebuilds the copy) ----------------------------------------------------------
    Mutant("isa-avx2-cap-runs-scalar", "csrc/lut_gather_cpu.cpp",
           "best == Isa::kAvx512) best = Isa::kAvx2;", "best == Isa::kAvx512) best = Isa::kScalar;",
           ["python_tests/test_lut_gather.py", "-k", "instruction_set_paths or reported_cpu_isa"],
           "MOLE_KERNELS_CPU_ISA=avx2 runs the scalar code (the AVX2 path goes untested)"),
    Mutant("isa-quant-scalar-cap-ignored", "csrc/lut_gather_quant_cpu.cpp",
           '(std::strcmp(cap, "scalar") == 0 || std::strcmp(cap, "avx2") == 0)',
           '(std::strcmp(cap, "avx2") == 0)',
           ["python_tests/test_quant.py", "-k", "scalar_cpu_path"],
           "the quantized gather ignores MOLE_KERNELS_CPU_ISA=scalar (its scalar path goes untested)"),
    Mutant("quant-avx512-one-element-tail", "csrc/lut_gather_quant_cpu.cpp",
           "if (j < stop) segment_scalar<ACC>(F, row, j, stop - j, s, out + j);",
           "if (j + 1 < stop) segment_scalar<ACC>(F, row, j, stop - j, s, out + j);",
           QUANT, "AVX-512 dequantization drops a block's last element when 1 is left after the vectors"),
    Mutant("quant-avx512-nf4-nibbles", "csrc/lut_gather_quant_cpu.cpp",
           "_mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0)",
           "_mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4)",
           QUANT, "the AVX-512 nf4 decoder swaps the nibbles"),
    Mutant("check-ids-off-by-one", "csrc/lut_gather_cpu.cpp",
           "if (id >= 0 && id < V) continue;", "if (id >= 0 && id <= V) continue;",
           ["python_tests/test_lut_gather.py", "-k", "out_of_range or fault"],
           "the bounds check lets id == V through (a read past the table)"),
    Mutant("fused-fault-bound-off-by-one", "csrc/lut_gather_cpu.cpp",
           "if (id < 0 || id >= p.V) {  // an id outside the table adds nothing",
           "if (id < 0 || id > p.V) {  // an id outside the table adds nothing",
           ["python_tests/test_lut_gather.py", "-k", "fault"],
           "with faults=, the fused kernel reads row V (past the table) instead of contributing zero"),
]


# ---------------------------------------------------------------- machinery --------------

def copy_tree(dst: str, tests: Optional[str]) -> None:
    ignore = shutil.ignore_patterns(".git", "build", "__pycache__", ".venv*", "venv", ".pytest_cache", "*.egg-info",
                                    ".benchmarks", "bench")
    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)
    if tests:
        shutil.rmtree(os.path.join(dst, "python_tests"))
        shutil.copytree(tests, os.path.join(dst, "python_tests"), ignore=ignore)


def apply(work: str, m: Mutant) -> str:
    """Writes the mutant into the copy; returns the original text (to restore)."""
    path = os.path.join(work, m.file)
    with open(path) as f:
        text = f.read()
    n = text.count(m.original)
    if n != 1:
        raise SystemExit(f"mutant {m.id}: the snippet occurs {n} times in {m.file} (must be exactly once; "
                         f"update the mutant after a code change):\n{m.original}")
    with open(path, "w") as f:
        f.write(text.replace(m.original, m.replacement))
    return text


def restore(work: str, m: Mutant, text: str) -> None:
    with open(os.path.join(work, m.file), "w") as f:
        f.write(text)


def build(work: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MOLE_KERNELS_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "1"))
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work, env=env,
                          capture_output=True, text=True)


def run_tests(work: str, m_tests: List[str], env: Dict[str, str], timeout: int, stop_first: bool):
    """(passed?, the first failing test or a reason, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "-W", "ignore::RuntimeWarning",
           *(["-x"] if stop_first else []), *m_tests]
    full_env = dict(os.environ, PYTHONPATH=work, **env)
    full_env.pop("MOLE_KERNELS_CPU_ISA", None)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=work, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s", time.time() - t0
    dt = time.time() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return True, "", dt
    if proc.returncode == 5:
        return False, "no tests selected (fix the mutant's test arguments)", dt
    hit = re.search(r"^(FAILED|ERROR) (\S+)", out, re.M)
    if hit:
        return False, hit.group(2), dt
    tail = [line for line in out.strip().splitlines() if line.strip()][-1:] or [""]
    return False, f"exit code {proc.returncode}: {tail[0][:100]}", dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--python-only", action="store_true", help="skip the C++ mutants (no rebuilds)")
    ap.add_argument("--tests", help="a python_tests folder to use instead of this checkout's")
    ap.add_argument("--no-baseline", action="store_true", help="do not run the selections unmutated first")
    ap.add_argument("--keep", action="store_true", help="keep the working copy (its path is printed)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run (default 900)")
    args = ap.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    assert len(set(ids)) == len(ids), "mutant ids must be unique"
    chosen = MUTANTS
    if args.only:
        want = args.only.split(",")
        unknown = sorted(set(want) - set(ids))
        if unknown:
            ap.error(f"unknown mutant ids: {unknown}")
        chosen = [m for m in MUTANTS if m.id in want]
    if args.python_only:
        chosen = [m for m in chosen if not m.cpp]
    if args.list:
        for m in chosen:
            print(f"{m.id:32s} {m.file:32s} {m.note}{' [equivalent]' if m.equivalent else ''}")
        return 0
    if not glob.glob(os.path.join(ROOT, "mole_kernels", "_C*.so")) and not glob.glob(
            os.path.join(ROOT, "mole_kernels", "_C*.pyd")):
        print("mutate.py: build the extension in place first: python setup.py build_ext --inplace", file=sys.stderr)
        return 2
    # Python mutants first, on the copied build; C++ ones last, grouped by file (fewer recompiles).
    chosen = sorted(chosen, key=lambda m: (m.cpp, m.file if m.cpp else ""))

    work = tempfile.mkdtemp(prefix="mole_mutate_")
    try:
        copy_tree(work, args.tests)
        print(f"working copy: {work}", flush=True)
        for m in chosen:  # every snippet applies exactly once before anything runs
            restore(work, m, apply(work, m))
        if not args.no_baseline:
            seen = set()
            for m in chosen:
                key = (tuple(m.tests), tuple(sorted(m.env.items())))
                if key in seen:
                    continue
                seen.add(key)
                ok, why, dt = run_tests(work, m.tests, m.env, args.timeout, stop_first=True)
                print(f"baseline {' '.join(m.tests)} {m.env or ''}: {'ok' if ok else 'FAILS: ' + why} ({dt:.0f} s)",
                      flush=True)
                if not ok:
                    print("mutate.py: the tests fail without any mutant; fix that first", file=sys.stderr)
                    return 2
        results = []
        for m in chosen:
            text = apply(work, m)
            t0 = time.time()
            try:
                if m.cpp:
                    b = build(work)
                    if b.returncode != 0:
                        results.append((m, "invalid", "does not compile", time.time() - t0))
                        print(f"{m.id}: does not compile\n{b.stderr[-2000:]}", flush=True)
                        continue
                ok, why, _ = run_tests(work, m.tests, m.env, args.timeout, stop_first=True)
            finally:
                restore(work, m, text)
            status = "survived" if ok else "killed"
            results.append((m, status, why, time.time() - t0))
            print(f"{m.id}: {status}{' by ' + why if why else ''} ({time.time() - t0:.0f} s)", flush=True)

        print()
        print("| mutant | file | result | killed by | bug |")
        print("| --- | --- | --- | --- | --- |")
        for m, status, why, dt in results:
            shown = f"{status} (equivalent: {m.equivalent})" if m.equivalent else status
            print(f"| {m.id} | {m.file} | {shown} | {why.replace('|', '/')} | {m.note} |")
        counted = [(m, s) for m, s, _, _ in results if not m.equivalent and s != "invalid"]
        killed = sum(s == "killed" for _, s in counted)
        survivors = [m.id for m, s in counted if s == "survived"]
        print(f"\nkilled {killed} of {len(counted)} non-equivalent mutants ({100.0 * killed / max(1, len(counted)):.0f} %)"
              + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
        return 0 if not survivors else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
