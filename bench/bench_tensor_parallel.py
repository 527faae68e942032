"""Decode latency of the tensor-parallel models (mole_kernels/model/tensor_parallel.py), N = 1 and 2.

What one round is: the time per token of a block of decode steps (batch 1, one new token per
step against a KV cache of CONTEXT earlier tokens: what `generate`'s loop runs), measured on rank
0 of a `torchrun --standalone --nproc-per-node 2` job on this machine's CPUs with gloo. `op` is
`tp-decode`; the group (shape) says the world size:

- `<model>-N1`: rank 0 alone, rank 1 idle: `dense (1 process)` and `mole-host (1 process)` (the
  single-process models), `dense-tp` and `mole-tp-host` (the TP models over a group of one rank:
  their sharding code, no collective);
- `<model>-N2`: both ranks, each with 1 CPU thread, so N = 2 uses both of this machine's 2 cores:
  `dense-tp` (the baseline: the same sharding minus the LUT) and `mole-tp-host` (LUT columns
  sharded, on the host tier); per layer both do two all-reduces of D floats and nothing else;
- `<model>-N2-comm`: `all-reduce x 2L`: the 2L all-reduces of D floats a decode step of either
  TP model does, alone (what communication costs here).

Every provider's blocks are interleaved in one run (round-robin, rotating the order each
repetition), so machine load (this machine is shared: `load1` in each row) hits all alike;
the median is over repetitions. `bytes` = LUT bytes one rank reads per token (0 for dense).

Sizes: the 160M-4E shape (D=768, FFN 3072, 12 heads, E=4) with L capped at 4 layers, vocabulary
4,096, context 128, model weights float32, LUT bfloat16 with random rows (values do not change
the cost), Zipf token ids. Smoke: tiny.

NCCL on GPUs is designed for (`init_tensor_parallel` picks it when CUDA is present; the ranks'
collectives are the same) but **not measured**: this machine has no GPU, and a 2-rank NCCL run
needs two GPUs.

pytest-benchmark times calls in the pytest process; these steps run in the torchrun ranks. So
the module fixture launches the job (this file run by torchrun), and each test feeds its
provider's per-token times into pytest-benchmark's statistics as `pedantic()` does round by
round (`_record`), which is the only place that touches pytest-benchmark internals.

Standalone: `torchrun --standalone --nproc-per-node 2 bench/bench_tensor_parallel.py --json out.json`.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import SMOKE, Rotation, zipf_ids

NAME = "160M-4E"
if SMOKE:
    CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
               num_experts=4)
    CONTEXT, REPS, STEPS = 16, 2, 2
else:
    CFG = dict(vocab_size=4096, hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
               num_experts=4)
    CONTEXT, REPS, STEPS = 128, 15, 8
LUT_DTYPE = torch.bfloat16
JOB_TIMEOUT_S = 900
# (group suffix, provider): every row of the run
ROWS = [("N1", "dense (1 process)"), ("N1", "mole-host (1 process)"), ("N1", "dense-tp"), ("N1", "mole-tp-host"),
        ("N2", "dense-tp"), ("N2", "mole-tp-host"), ("N2-comm", "all-reduce x 2L")]


# ---------------------------------------------------------------- the torchrun job -------------------


def _decode_block(model, ids):
    """A callable running STEPS decode steps (generate's step, static shapes) on rotated ``ids``
    (its own rotation: every rank of a TP model feeds the same ids)."""
    tokens = Rotation(t.view(1) for t in ids)
    cache = model._new_cache(1, CONTEXT + 1)
    cache.valid[:, :CONTEXT] = True  # CONTEXT earlier tokens (zero K/V: attention costs the same)
    idx, pos = torch.tensor([CONTEXT]), torch.full((1,), CONTEXT)

    @torch.no_grad()
    def block():
        for _ in range(STEPS):
            model._decode_step(cache, tokens.next(), idx, pos)

    return block


def _job(out_path):
    import torch.distributed as dist

    from mole_kernels.model import DenseForCausalLM, MoLEConfig, MoLEForCausalLM
    from mole_kernels.model.tensor_parallel import TPDenseForCausalLM, TPMoLEForCausalLM, init_tensor_parallel
    from mole_kernels.table import LookupTable

    torch.set_num_threads(1)
    world = init_tensor_parallel("gloo")
    rank = dist.get_rank()
    if dist.get_world_size() != 2:
        raise SystemExit("run with torchrun --nproc-per-node 2")
    solo = dist.new_group([0])  # the N = 1 rows: rank 0 alone (every rank must create the group)
    cfg = MoLEConfig(**CFG, max_position_embeddings=CONTEXT + 1)
    torch.manual_seed(0)
    mole = MoLEForCausalLM(cfg, reparameterized=True).eval()
    lut = torch.empty(cfg.lut_shape, dtype=LUT_DTYPE).uniform_(-0.02, 0.02)
    mole.set_lut(LookupTable.from_tensor(lut, "host"))
    del lut
    ids = zipf_ids(cfg.vocab_size, 64, seed=1).view(-1)
    blocks = {}
    if rank == 0:
        blocks[("N1", "dense (1 process)")] = _decode_block(DenseForCausalLM.from_mole(mole), ids)
        blocks[("N1", "mole-host (1 process)")] = _decode_block(mole, ids)
        blocks[("N1", "dense-tp")] = _decode_block(TPDenseForCausalLM.from_model(mole, solo), ids)
        blocks[("N1", "mole-tp-host")] = _decode_block(TPMoLEForCausalLM.from_model(mole, solo), ids)
    blocks[("N2", "dense-tp")] = _decode_block(TPDenseForCausalLM.from_model(mole, world), ids)
    tp2 = TPMoLEForCausalLM.from_model(mole, world)
    blocks[("N2", "mole-tp-host")] = _decode_block(tp2, ids)
    bufs = [torch.zeros(cfg.hidden_size) for _ in range(2 * cfg.num_hidden_layers)]

    def all_reduces():
        for _ in range(STEPS):
            for b in bufs:
                dist.all_reduce(b)

    blocks[("N2-comm", "all-reduce x 2L")] = all_reduces
    samples = {f"{g}/{p}": [] for g, p in ROWS}
    for rep in range(REPS + 1):  # repetition 0 warms up (lazy buffers, first collectives)
        order = ROWS[rep % len(ROWS):] + ROWS[:rep % len(ROWS)]
        for key in order:
            dist.barrier()  # start together; N1 rows: rank 1 waits here while rank 0 runs
            if key not in blocks:
                continue
            t0 = time.perf_counter()
            blocks[key]()
            if rep:
                samples[f"{key[0]}/{key[1]}"].append((time.perf_counter() - t0) / STEPS)
    if rank == 0:
        L, E, D = cfg.num_hidden_layers, cfg.num_experts, cfg.hidden_size
        info = dict(layers=L, vocab=cfg.vocab_size, context=CONTEXT, steps_per_round=STEPS, reps=REPS,
                    lut_bytes_per_token={"N1": L * E * D * LUT_DTYPE.itemsize,
                                         "N2": tp2.lut.row_bytes},
                    lut_bytes_per_rank={"N1": mole.lut.nbytes, "N2": tp2.lut.nbytes})
        with open(out_path, "w") as f:
            json.dump(dict(samples=samples, info=info), f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- pytest-benchmark ---------------------


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path_factory.mktemp("tp") / "tp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.abspath(__file__), "--json", str(out)]
    # The ranks import what this process imports (the installed package, or the tree built in place).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0 and out.exists(), f"the torchrun job failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _record(benchmark, samples):
    """Feeds per-token times measured in the ranks into the benchmark's statistics, as pedantic() does
    round by round (pytest-benchmark has no API for times measured in other processes)."""
    benchmark._mode = "benchmark.pedantic(...)"  # used once, like pedantic
    if benchmark.disabled:  # --benchmark-disable (smoke CI): the job ran; nothing to record
        return
    stats = benchmark._make_stats(1)
    for s in samples:
        stats.update(s)


@pytest.mark.parametrize("group, provider", ROWS, ids=[f"{g}-{p}" for g, p in ROWS])
def test_tp_decode(benchmark, tp_run, group, provider):
    info, samples = tp_run["info"], tp_run["samples"][f"{group}/{provider}"]
    assert len(samples) == REPS and all(s > 0 for s in samples)
    n = group[:2]
    benchmark.group = f"tp-decode-{NAME}-{group}"
    benchmark.extra_info.update(
        op="tp-decode", provider=provider, shape=f"{NAME}-{group}", device="cpu", backend="gloo",
        tensor_parallel=int(n[1]), threads=1, dtype=f"model=float32,lut={str(LUT_DTYPE)[6:]}",
        layers=info["layers"], vocab=info["vocab"], context=info["context"], tokens=1,
        rounds_are=f"mean of {info['steps_per_round']} decode steps, repetitions interleaved across providers",
        scaled_from="L=12,V=50304" if not SMOKE else None,
        bytes=info["lut_bytes_per_token"][n] if provider.startswith("mole") else 0,
        lut_bytes_per_rank=info["lut_bytes_per_rank"][n] if provider.startswith("mole") else 0)
    _record(benchmark, samples)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="the torchrun job behind test_tp_decode (2 ranks)")
    ap.add_argument("--json", required=True, help="where rank 0 writes the per-token times")
    _job(ap.parse_args().json)
