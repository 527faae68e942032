"""Extra peak RSS of loading / re-parameterizing a MoLE LUT, each call in a fresh child process.

Issue 15's goals (extra peak RSS over the process before the call, as a multiple of the LUT's bytes):
disk tier <= 0.25x, host tier <= 1.15x, for ``from_pretrained`` (single-file and sharded official
folders, float and quantized ``LookupTable`` files) and for ``reparameterize``; and the time to open an
official folder on the disk tier independent of the LUT's size.

How one measurement runs (``measure``): a child process (``python memory_peaks.py --child ...``)
imports torch and mole_kernels and prepares everything that is "before the call" (the folder is
already on disk; for ``reparameterize`` the train-form model is constructed), runs the same call
once on a tiny table (1 MiB checkpoints; an 8-token model) so that torch's kernels and the readers
have mapped their code and workspaces (10-25 MiB on first use whatever the table's size: not the
table's memory), then ``gc.collect()``,
``malloc_trim(0)`` (memory freed earlier goes back to the kernel, so the call cannot hide its own
allocations in pages the process already held), writes ``5`` to ``/proc/self/clear_refs`` (resets
VmHWM to the current RSS), reads VmRSS as the baseline, runs the call, reads VmHWM while the result
is still alive, and prints one JSON line. ``extra_peak_bytes = VmHWM - baseline``; ``ratio =
extra_peak_bytes / lut_bytes`` (``lut_bytes``: ``model.lut.nbytes``, the quantized bytes for an int8
table). The call's other weights (a few % of the LUT here: fp16, tied embeddings) count in the peak
as the issue's definition says; ``other_bytes`` says how much they are.

Where clear_refs cannot be written, VmHWM is read before and after instead: when the call did not
raise the process's earlier high-water mark the result is an upper bound (``hwm_reset: false``,
``upper_bound: true``).

Synthetic checkpoints (``build``; in a child process too, the LUT made once in fp16 and written
straight to each file): hidden 128, 8 layers, 4 experts, so a LUT row is 8 KiB and ``size`` MiB of
LUT is V = 128 * size tokens; ``single/`` (config.json + model.safetensors with
``model.moe_table.weight`` [V, L*E*D]), ``sharded/`` (the LUT alone in its own shard, the rest in
another, ``model.safetensors.index.json``), ``bin/`` (``pytorch_model.bin``, torch's zip format),
``nolut/`` (the folder without the LUT) with
``lut-float.safetensors`` and ``lut-int8.safetensors`` (``LookupTable.save`` files).

Cases (each x placement host and disk): ``from_pretrained-single``, ``from_pretrained-sharded``,
``from_pretrained-bin``, ``from_pretrained-lut_file-float``, ``from_pretrained-lut_file-int8``, ``reparameterize`` (train
form -> inference form, LUT fp16); ``from_pretrained-transformers`` (``AutoModelForCausalLM`` through
``mole_kernels.integrations.hf`` on the single-file folder as a "mole" folder; needs transformers, so not in
CASES: ``--cases from_pretrained-transformers``); and ``open-time``: ``from_pretrained(single, placement="disk")``
timed at two LUT sizes that differ only in the number of experts (so every other weight is the
same), the best of several interleaved calls each, ``ratio = t_big / t_small`` (goal: close to 1).

    python bench/memory_peaks.py                      # 400 MiB LUT, every case, a table
    python bench/memory_peaks.py --size 4             # the constant overhead at a tiny table
    python bench/memory_peaks.py --cases reparameterize --placements disk --json out.json
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.abspath(__file__)
CASES = ("from_pretrained-single", "from_pretrained-sharded", "from_pretrained-bin",
         "from_pretrained-lut_file-float", "from_pretrained-lut_file-int8", "reparameterize")
PLACEMENTS = ("host", "disk")
# transformers' AutoModelForCausalLM.from_pretrained through mole_kernels.integrations.hf (issue 21): same goals.
HF_CASE = "from_pretrained-transformers"
GOALS = {"disk": 0.25, "host": 1.15}  # issue 15: extra peak RSS / LUT bytes
OPEN_TIME_GOAL = 1.5  # t(512 MiB) / t(64 MiB); see bench_memory.py for why 1.5
OPEN_TIME_SIZES = (64, 512)  # MiB
LUT_KEY = "model.moe_table.weight"
# The shape: L, E, D fixed (hidden 128, small FFN), so the LUT dominates; V = 128 tokens per MiB.
LAYERS, EXPERTS, HIDDEN, FFN, HEADS = 8, 4, 128, 64, 2
ROW_BYTES = LAYERS * EXPERTS * HIDDEN * 2  # fp16: 8 KiB per token


def status_available() -> bool:
    """Whether this OS has /proc/self/status with VmHWM (Linux)."""
    try:
        with open("/proc/self/status") as f:
            return "VmHWM" in f.read()
    except OSError:
        return False


def config_kwargs(size_mib: int, experts: int = EXPERTS, vocab: Optional[int] = None) -> dict:
    """MoLEConfig arguments of a synthetic model whose fp16 LUT is `size_mib` MiB."""
    V = vocab if vocab is not None else size_mib * (1 << 20) // ROW_BYTES
    return dict(vocab_size=V, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, num_experts=experts,
                tie_word_embeddings=True)


def _open_time_kwargs(size_mib: int) -> dict:
    """Open-time sizes: the same V (8,192) and weights, the LUT scaled by the number of experts."""
    V = 8192
    E = size_mib * (1 << 20) // (V * LAYERS * HIDDEN * 2)
    if E < 1 or E * V * LAYERS * HIDDEN * 2 != size_mib << 20:
        raise ValueError(f"open-time: {size_mib} MiB is not a multiple of 16 MiB")
    return config_kwargs(size_mib, experts=E, vocab=V)


# ------------------------------------------------------------------ building (child) ------------


def _build(out: str, kw: dict, what: str, seed: int = 0) -> None:
    """Writes the synthetic checkpoint files `what` (comma list) under `out` (runs in a child)."""
    import torch
    from safetensors.torch import save_file

    from mole_kernels import LookupTable, MoLEConfig, MoLEForCausalLM

    what = set(what.split(","))
    cfg = MoLEConfig(**kw)
    V, L, E, D = cfg.lut_shape
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = MoLEForCausalLM(cfg, reparameterized=True)
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":  # tied: from_pretrained takes it from the embedding
            continue
        sd[k] = (torch.randn(v.shape) * 0.02).to(torch.float16) if v.dim() > 1 else torch.ones(v.shape,
                                                                                               dtype=torch.float16)
    config = dict(cfg.to_dict(), architectures=["MoleForCausalLM"], model_type="llama", torch_dtype="float16")
    lut = torch.randn((V, L * E * D), dtype=torch.float16)  # made once, in fp16 (never a float32 copy)
    lut.mul_(0.02)

    def folder(name, files):
        path = os.path.join(out, name)
        os.makedirs(path, exist_ok=True)
        for fname, tensors in files.items():
            if fname.endswith(".safetensors"):
                save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
            else:
                with open(os.path.join(path, fname), "w") as f:
                    json.dump(tensors, f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)

    if "single" in what:
        folder("single", {"model.safetensors": dict(sd, **{LUT_KEY: lut})})
    if "sharded" in what:
        shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
        total = sum(v.numel() * v.element_size() for v in sd.values()) + lut.numel() * lut.element_size()
        index = {"metadata": {"total_size": total},
                 "weight_map": dict({k: shards[0] for k in sd}, **{LUT_KEY: shards[1]})}
        folder("sharded", {shards[0]: sd, shards[1]: {LUT_KEY: lut}, "model.safetensors.index.json": index})
    if "bin" in what:  # pytorch_model.bin in torch's zip format
        os.makedirs(os.path.join(out, "bin"), exist_ok=True)
        torch.save(dict(sd, **{LUT_KEY: lut}), os.path.join(out, "bin", "pytorch_model.bin"))
        with open(os.path.join(out, "bin", "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    if "nolut" in what:
        folder("nolut", {"model.safetensors": sd})
    if "lut-float" in what:
        LookupTable.from_tensor(lut.view(V, L, E, D), "disk", path=os.path.join(out, "lut-float.safetensors")).close()
    if "lut-int8" in what:
        LookupTable.from_tensor(lut.view(V, L, E, D), "disk", path=os.path.join(out, "lut-int8.safetensors"),
                                format="int8").close()
    with open(os.path.join(out, "other_bytes"), "w") as f:
        f.write(str(sum(v.numel() * v.element_size() for v in sd.values())))


ALL_FILES = "single,sharded,bin,nolut,lut-float,lut-int8"


def _env(tmpdir: str) -> dict:
    """The child's environment: anonymous temp files (a disk tier's own copy) go under tmpdir."""
    scratch = os.path.join(tmpdir, "scratch")
    os.makedirs(scratch, exist_ok=True)
    env = dict(os.environ, TMPDIR=scratch)
    import importlib.util

    spec = importlib.util.find_spec("mole_kernels")  # the package this process would import (no import)
    root = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else None
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _results(jobs, stdout, returncode, stderr):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("[")]
    if returncode or not lines:
        raise RuntimeError(f"memory_peaks child failed (exit {returncode}) on {jobs}:\n{stdout[-2000:]}\n"
                           f"{stderr[-4000:]}")
    out = []
    for job, r in zip(jobs, json.loads(lines[-1])):
        if "error" in r:
            raise RuntimeError(f"memory_peaks: {job[0]} {job[1:3]} failed:\n{r['error']}")
        out.append(r["ok"])
    return out


def _call_child(jobs, tmpdir, timeout):
    """Runs `jobs` in one new child process, in order; their results (an error raises)."""
    cmd = [sys.executable, HERE, "--child", json.dumps(jobs)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmpdir), timeout=timeout)
    return _results(jobs, res.stdout, res.returncode, res.stderr)


class _Waiting:
    """A child started ahead of its job: it imports torch while an earlier measurement runs."""

    def __init__(self, tmpdir):
        self.proc = subprocess.Popen([sys.executable, HERE, "--child", "--wait"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmpdir))

    def run(self, job, timeout):
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            self.proc.kill()
            out, err = self.proc.communicate()
            raise RuntimeError(f"memory_peaks child did not start:\n{ready}{out}\n{err[-4000:]}")
        try:
            out, err = self.proc.communicate(json.dumps(job) + "\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return _results([job], out, self.proc.returncode, err)[0]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


WARM_MIB = 1  # the tiny checkpoints every measurement first runs its call on (see _child_measure)


def _files_dir(tmpdir, size_mib):
    return os.path.join(tmpdir, f"mole-{size_mib}MiB")


def _open_dir(tmpdir, size_mib):
    return os.path.join(tmpdir, f"mole-open-{size_mib}MiB")


def _build_jobs(tmpdir, sizes=(), open_sizes=()):
    """Build jobs for what is not yet under tmpdir (each folder is built once and reused)."""
    jobs = []
    for size in sorted(set(sizes) | ({WARM_MIB} if sizes else set())):
        out = _files_dir(tmpdir, size)
        if not os.path.exists(os.path.join(out, "done")):
            jobs.append(["build", out, config_kwargs(size), ALL_FILES])
    for size in open_sizes:
        out = _open_dir(tmpdir, size)
        if not os.path.exists(os.path.join(out, "done")):
            jobs.append(["build", out, _open_time_kwargs(size), "single"])
    return jobs


def _mark_built(jobs):
    for job in jobs:
        open(os.path.join(job[1], "done"), "w").close()


def build(size_mib: int, tmpdir: str, *, open_sizes=(), timeout: float = 600) -> str:
    """Builds (once) the synthetic checkpoints of a `size_mib` MiB LUT under tmpdir; their folder."""
    jobs = _build_jobs(tmpdir, [size_mib], open_sizes)
    for job in jobs:
        os.makedirs(job[1], exist_ok=True)
    if jobs:
        _call_child(jobs, tmpdir, timeout)
        _mark_built(jobs)
    return _files_dir(tmpdir, size_mib)


# ------------------------------------------------------------------ measuring (child) ------------


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_of(call):
    """(result, seconds, measurement dict) of call(), its peak RSS over the RSS just before it."""
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _status()
    t0 = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - t0
    after = _status()  # read while `result` is alive
    extra = after["VmHWM"] - before["VmRSS"]
    return result, seconds, dict(
        extra_peak_bytes=extra, baseline_rss_bytes=before["VmRSS"], peak_rss_bytes=after["VmHWM"],
        rss_after_bytes=after["VmRSS"], rss_after_anon_bytes=after.get("RssAnon"),
        rss_after_file_bytes=after.get("RssFile"), hwm_reset=reset,
        upper_bound=not reset and after["VmHWM"] <= before["VmHWM"])


def _as_mole_folder(src: str) -> str:
    """``src`` (official layout, "model_type": "llama") as a folder this package would write ("mole"),
    next to it: config.json rewritten, the weight file hard-linked (no copy). Made before the call."""
    dst = src + "-mole"
    if not os.path.isdir(dst):
        os.makedirs(dst)
        with open(os.path.join(src, "config.json")) as f:
            config = dict(json.load(f), model_type="mole")
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f)
        try:
            os.link(os.path.join(src, "model.safetensors"), os.path.join(dst, "model.safetensors"))
        except OSError:
            shutil.copyfile(os.path.join(src, "model.safetensors"), os.path.join(dst, "model.safetensors"))
    return dst


def _child_measure(case: str, placement: str, files: str, kw: dict, scratch: str, warm_files: str) -> dict:
    import safetensors.torch  # noqa: F401 - an import is not the call's memory
    import torch

    from mole_kernels import MoLEConfig, MoLEForCausalLM

    torch.set_grad_enabled(False)
    if case == "reparameterize":
        cfg = MoLEConfig(**kw)
        torch.manual_seed(0)
        model = MoLEForCausalLM(cfg)  # the train form: built before the call
        path = os.path.join(scratch, f"reparam-{os.getpid()}.safetensors") if placement == "disk" else None
        warm = MoLEForCausalLM(MoLEConfig(**dict(kw, vocab_size=8)))

        def call(model=model, path=path):
            return model.reparameterize(placement=placement, dtype=torch.float16, path=path, progress=False)

        def warm_up():
            call(warm, None).lut.close()
    elif case == HF_CASE:  # the transformers integration's Auto path, on the single-file folder
        import mole_kernels.integrations.hf  # noqa: F401 - registers "mole"; an import is not the call's memory
        from transformers import AutoModelForCausalLM

        def call(files=files):
            return AutoModelForCausalLM.from_pretrained(_as_mole_folder(os.path.join(files, "single")),
                                                        lut_placement=placement)

        def warm_up():
            call(warm_files).lut.close()
    else:
        source = {"from_pretrained-single": ("single", None), "from_pretrained-sharded": ("sharded", None),
                  "from_pretrained-bin": ("bin", None),
                  "from_pretrained-lut_file-float": ("nolut", "lut-float.safetensors"),
                  "from_pretrained-lut_file-int8": ("nolut", "lut-int8.safetensors")}[case]
        def call(files=files):
            return MoLEForCausalLM.from_pretrained(os.path.join(files, source[0]), placement=placement,
                                                   lut_file=os.path.join(files, source[1]) if source[1] else None)

        def warm_up():
            call(warm_files).lut.close()

    # The same call on a 1 MiB table first: torch's kernels and the readers map their code and
    # workspaces on first use (10-25 MiB whatever the table's size), which is not the table's memory.
    warm_up()
    out, seconds, m = _peak_of(call)
    lut_bytes = out.lut.nbytes
    assert out.lut.placement == placement, (out.lut.placement, placement)
    other = os.path.join(files, "other_bytes")
    other_bytes = None
    if os.path.exists(other):
        with open(other) as f:
            other_bytes = int(f.read())
    out.lut.close()
    if case == "reparameterize" and placement == "disk" and os.path.exists(path):
        os.unlink(path)
    return dict(m, case=case, placement=placement, lut_bytes=lut_bytes, ratio=m["extra_peak_bytes"] / lut_bytes,
                seconds=seconds, other_bytes=other_bytes, lut_shape=list(out.lut.shape),
                goal=GOALS[placement], pid=os.getpid())


def _child_open_time(small: str, big: str, repeats: int) -> dict:
    import torch

    from mole_kernels import MoLEForCausalLM

    torch.set_grad_enabled(False)
    times = {small: [], big: []}
    nbytes = {}
    for r in range(repeats + 1):  # round 0 warms up (lazy imports, first-call costs): not counted
        for folder in (small, big) if r % 2 else (big, small):
            t0 = time.perf_counter()
            m = MoLEForCausalLM.from_pretrained(folder, placement="disk")
            dt = time.perf_counter() - t0
            nbytes[folder] = m.lut.nbytes
            m.lut.close()
            del m
            gc.collect()
            if r:
                times[folder].append(dt)
    ts, tb = min(times[small]), min(times[big])
    return dict(case="open-time", placement="disk", seconds_small=ts, seconds_big=tb, ratio=tb / ts,
                lut_bytes_small=nbytes[small], lut_bytes_big=nbytes[big], lut_bytes=nbytes[big],
                times_small=times[small], times_big=times[big], goal=OPEN_TIME_GOAL, repeats=repeats)


def _run_job(job) -> dict:
    kind = job[0]
    if kind == "build":
        out, kw, what = job[1], job[2], job[3]
        _build(out, kw, what)
        return {"built": out}
    if kind == "measure":
        return _child_measure(*job[1:])
    if kind == "open-time":
        return _child_open_time(*job[1:])
    raise ValueError(f"unknown job kind {kind!r}")


def _run_jobs(jobs) -> list:
    out = []
    for job in jobs:
        try:
            out.append({"ok": _run_job(job)})
        except Exception:
            import traceback

            out.append({"error": traceback.format_exc()})
            break
    return out


def child_main(argv) -> None:
    """`--child JOBS`: runs the JSON list of jobs here, in order (one measurement per process: the
    measurements never share a process; builds may). `--child-wait`: imports what a measurement
    imports, says "ready", then runs the one job read from stdin (see measure_many)."""
    if argv and argv[0] == "--wait":
        import safetensors.torch  # noqa: F401 - the same imports _child_measure does before the call
        import torch  # noqa: F401

        import mole_kernels  # noqa: F401

        print("ready", flush=True)
        jobs = [json.loads(sys.stdin.readline())]
    else:
        jobs = json.loads(argv[0])
    print(json.dumps(_run_jobs(jobs)), flush=True)


# ------------------------------------------------------------------ parent API -------------------


def _job(case, size, tmpdir, placement):
    if case == "open-time":
        small, big = size or OPEN_TIME_SIZES
        return ["open-time", os.path.join(_open_dir(tmpdir, small), "single"),
                os.path.join(_open_dir(tmpdir, big), "single"), 5]
    if case not in CASES + (HF_CASE,):
        raise ValueError(f"measure: case must be one of {CASES + (HF_CASE, 'open-time')}, got {case!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"measure: placement must be one of {PLACEMENTS}, got {placement!r}")
    return ["measure", case, placement, _files_dir(tmpdir, size), config_kwargs(size), os.path.join(tmpdir, "scratch"),
            _files_dir(tmpdir, WARM_MIB)]


def measure_many(requests, tmpdir: str, *, lookahead: int = 2, timeout: float = 900) -> list:
    """Several measurements [(case, size, placement)], each in its own fresh child process, as
    `measure`; faster: the checkpoints are built by one child first, and while a measurement runs
    the next `lookahead` children are already importing torch (a waiting child has only imported
    when its job arrives, so its memory state is a fresh child's; its timing may share the CPU
    with the others' imports, except the last job's: put open-time last)."""
    sizes = sorted({s for c, s, _ in requests if c not in ("open-time", "reparameterize")})
    opens = sorted({x for c, s, _ in requests if c == "open-time" for x in (s or OPEN_TIME_SIZES)})
    builds = _build_jobs(tmpdir, sizes, opens)
    for job in builds:
        os.makedirs(job[1], exist_ok=True)
    jobs = [_job(c, s, tmpdir, p) for c, s, p in requests]
    children = [_Waiting(tmpdir) for _ in jobs[:lookahead]]  # they import while the builds run
    out = []
    try:
        if builds:
            _call_child(builds, tmpdir, timeout)
            _mark_built(builds)
        for i, ((c, s, _), job) in enumerate(zip(requests, jobs)):
            if i + lookahead < len(jobs):
                children.append(_Waiting(tmpdir))
            r = children[i].run(job, timeout)
            out.append(dict(r, size_mib=list(s or OPEN_TIME_SIZES) if c == "open-time" else s))
    finally:
        for ch in children:
            ch.kill()
    return out


def measure(case: str, size, tmpdir: str, placement: str = "host", *, timeout: float = 600) -> dict:
    """One measurement in a fresh child process (`python memory_peaks.py --child ...`).

    case: one of CASES (size: the LUT in MiB; placement: "host" or "disk") or "open-time" (size: a
    pair of MiB sizes, multiples of 16, default OPEN_TIME_SIZES; placement is disk). The checkpoint
    files are built under tmpdir (by another child) on first use and reused.
    """
    if case == "open-time":
        jobs = _build_jobs(tmpdir, (), size or OPEN_TIME_SIZES)
    else:
        jobs = _build_jobs(tmpdir, () if case == "reparameterize" else [size], ())
    for job in jobs:
        os.makedirs(job[1], exist_ok=True)
    if jobs:
        _call_child(jobs, tmpdir, timeout)
        _mark_built(jobs)
    [r] = _call_child([_job(case, size, tmpdir, placement)], tmpdir, timeout)
    return dict(r, size_mib=list(size or OPEN_TIME_SIZES) if case == "open-time" else size)


def measure_all(size, tmpdir, cases=CASES, placements=PLACEMENTS, open_sizes=OPEN_TIME_SIZES, *, fresh=False):
    """Every case x placement at `size` MiB, then open-time at open_sizes (None: skipped). fresh:
    each child started when its measurement is due (`measure`); else `measure_many`."""
    requests = [(c, size, p) for c in cases for p in placements]
    if open_sizes:
        requests.append(("open-time", tuple(open_sizes), "disk"))
    if fresh:
        return [measure(c, s, tmpdir, p) for c, s, p in requests]
    return measure_many(requests, tmpdir)


def table(rows) -> str:
    mib = 1 << 20
    out = [f"{'case':34s} {'placement':9s} {'LUT MiB':>8s} {'extra peak MiB':>14s} {'ratio':>7s} {'goal':>6s} "
           f"{'seconds':>8s}  met"]
    for r in rows:
        if r["case"] == "open-time":
            out.append(f"{'open-time (t_big / t_small)':34s} {'disk':9s} {r['lut_bytes_big'] / mib:8.0f} "
                       f"{'':>14s} {r['ratio']:7.2f} {r['goal']:6.2f} "
                       f"{r['seconds_small'] * 1e3:.1f}/{r['seconds_big'] * 1e3:.1f} ms  "
                       f"{'yes' if r['ratio'] <= r['goal'] else 'NO'}")
            continue
        out.append(f"{r['case']:34s} {r['placement']:9s} {r['lut_bytes'] / mib:8.1f} "
                   f"{r['extra_peak_bytes'] / mib:14.1f} {r['ratio']:7.3f} {r['goal']:6.2f} {r['seconds']:8.2f}  "
                   f"{'yes' if r['ratio'] <= r['goal'] else 'NO'}" + ("  (upper bound)" if r.get("upper_bound") else ""))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=400, help="LUT MiB (fp16; V = 128 * size) [400]")
    ap.add_argument("--cases", default=",".join(CASES), help="comma list of cases")
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    ap.add_argument("--open-sizes", default=",".join(map(str, OPEN_TIME_SIZES)),
                    help="two MiB sizes (multiples of 16) for open-time; '' to skip it")
    ap.add_argument("--tmpdir", default=None, help="where checkpoints are built (kept when given)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--fresh", action="store_true",
                    help="a new child process per measurement (default: children started ahead, one per measurement)")
    args = ap.parse_args(argv)
    if not status_available():
        raise SystemExit("memory_peaks: /proc/self/status (VmHWM) is not available on this OS")
    tmp = args.tmpdir or tempfile.mkdtemp(prefix="mole_mem_")
    try:
        cases = [c for c in args.cases.split(",") if c]
        placements = [p for p in args.placements.split(",") if p]
        open_sizes = tuple(int(x) for x in args.open_sizes.split(",")) if args.open_sizes else None
        rows = measure_all(args.size, tmp, cases, placements, open_sizes, fresh=args.fresh)
        print(table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    finally:
        if not args.tmpdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
