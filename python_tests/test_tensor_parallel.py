"""Tensor-parallel inference (``mole_kernels.model.tensor_parallel``) on gloo, in processes spawned here.

One job per world size (N = 2 and 4) runs every scenario below on every rank, in order, against
the single-process model that each rank also builds (same seed), and writes what each rank saw;
the tests assert on that. A job is bounded twice: the process group's timeout (a collective
waits at most PG_TIMEOUT_S) and the job's deadline (JOB_TIMEOUT_S, then its processes are killed
and the tests fail: a hang is a failure, never a wait).

Float32 tolerance. Tensor parallelism changes only the order of float32 additions: every matmul
over the heads or the MLP's units is summed in N chunks and the chunks by one all-reduce (N - 1
more roundings), and the LUT term joins the MLP's sum. Each ordering has a rounding error
bounded the same way (gamma_K * sum |terms|, K the number of terms), so the TP model is as far
from the exact result as the single-process model is, up to the luck of rounding. The exact
result is the train form in float64 (its LUT is the experts evaluated exactly); the tests
measure the single-process float32 model's distance from it, E, and require the TP model's to
be at most 2E (two independent roundings of the same size are at most 2E apart; a sharding bug
gives errors of the size of the logits, ~1, against E ~ 1e-6).
"""
import copy
import datetime
import json
import multiprocessing
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from mole_kernels import host_allocations
from mole_kernels.model import DenseForCausalLM, MoLEConfig, MoLEForCausalLM
from mole_kernels.model.tensor_parallel import TPDenseForCausalLM, TPMoLEForCausalLM, shard_file, write_sharded_tables

PG_TIMEOUT_S = 20
JOB_TIMEOUT_S = 120
NEW_TOKENS = 6
# V=64, D=32, L=2, E=3; 8 query / 4 key-value heads (grouped-query: 2 ranks hold 4/2, 4 ranks 2/1).
CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
           num_key_value_heads=4, num_experts=3)

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available in this torch build", allow_module_level=True)


# ---------------------------------------------------------------- what each rank runs ----------------


class _Setup:
    """The single-process models and prompt every rank builds identically (same seed)."""

    def __init__(self, rank, world, tmp):
        self.rank, self.world, self.tmp = rank, world, tmp
        torch.manual_seed(0)
        self.cfg = MoLEConfig(**CFG)
        self.train = MoLEForCausalLM(self.cfg, init_std=0.2).eval()
        self.single = self.train.reparameterize(placement="host", progress=False)
        self.prompt = torch.randint(0, self.cfg.vocab_size, (2, 5))
        self.mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # the second row left-padded
        self.ref = self.single.generate(self.prompt, self.mask, max_new_tokens=NEW_TOKENS)
        ref64 = copy.deepcopy(self.train).double()  # the exact result (experts evaluated in float64)
        with torch.no_grad():
            self.logits64 = ref64(self.ref).logits.double()
            # E: the float32 single-process model's distance from the exact result (see the module docstring)
            self.e32 = (self.single(self.ref).logits.double() - self.logits64).abs().max().item()
        self.base = os.path.join(tmp, "lut.safetensors")  # write_sharded_tables' base path, world size N

    def compare(self, tp, single=None):
        """Greedy tokens and teacher-forced logits of ``tp`` against the single-process model."""
        single = single or self.single
        ref = single.generate(self.prompt, self.mask, max_new_tokens=NEW_TOKENS) if single is not self.single \
            else self.ref
        seq = tp.generate(self.prompt, self.mask, max_new_tokens=NEW_TOKENS)
        with torch.no_grad():
            lt, ls = tp(ref).logits.double(), single(ref).logits.double()
        return dict(same_tokens=bool(torch.equal(seq, ref)), max_dlogit=(lt - ls).abs().max().item(),
                    tp_err=(lt - self.logits64).abs().max().item(), e32=self.e32, quantized=single is not self.single)


def _error_of(fn):
    """(exception type and message, seconds until it was raised) of a call expected to fail."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return dict(error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
    return dict(error=None, seconds=time.perf_counter() - t0)


def sc_mole_host(s):
    before = host_allocations()["bytes"]
    tp = TPMoLEForCausalLM.from_model(s.single, placement="host")
    held = host_allocations()["bytes"] - before  # exact-size host memory this rank's table allocated
    out = s.compare(tp)
    out.update(held=held, nbytes=tp.lut.nbytes, row_bytes=tp.lut.row_bytes, full_nbytes=s.single.lut.nbytes,
               full_row_bytes=s.single.lut.row_bytes, columns=[tp.lut_columns.start, tp.lut_columns.stop])
    tp.lut.close()
    return out


def sc_mole_disk_nf4(s):
    # nf4 blocks of 8 lie inside every rank's D/N columns: each rank's rows quantize exactly as the
    # single-process table's do, so the two models differ only by float32 summation order.
    single = s.train.reparameterize(placement="host", progress=False, lut_format="nf4", block_size=8)
    tp = TPMoLEForCausalLM.from_model(s.train, placement="disk", lut_format="nf4", block_size=8)
    out = s.compare(tp, single)
    out.update(format=tp.lut.format, placement=tp.lut.placement, row_bytes=tp.lut.row_bytes,
               full_row_bytes=single.lut.row_bytes)
    return out


def sc_dense(s):
    dense = DenseForCausalLM.from_mole(s.train)
    tp = TPDenseForCausalLM.from_model(s.train)
    return dict(same_tokens=bool(torch.equal(tp.generate(s.prompt, s.mask, max_new_tokens=NEW_TOKENS),
                                             dense.generate(s.prompt, s.mask, max_new_tokens=NEW_TOKENS))))


def _write_files(s):
    """On rank 0: the shards (world size N, and 4 for another world size), a second write of them, a
    single-process table file, and checkpoint folders of both forms (and a .bin one). The other ranks wait."""
    if s.rank == 0:
        write_sharded_tables(s.single.lut, s.base, s.world)
        write_sharded_tables(s.single.lut, os.path.join(s.tmp, "again.safetensors"), s.world)
        write_sharded_tables(s.single.lut, os.path.join(s.tmp, "four.safetensors"), 4)
        s.single.lut.save(os.path.join(s.tmp, "single.safetensors"))
        s.single.save_pretrained(os.path.join(s.tmp, "rep"))
        s.single.save_pretrained(os.path.join(s.tmp, "rep_bin"), safe_serialization=False)
        s.train.save_pretrained(os.path.join(s.tmp, "train"))
    dist.barrier()


def sc_shards(s):
    _write_files(s)
    rep = os.path.join(s.tmp, "rep")
    loads = {
        "lut_shards, disk": lambda: TPMoLEForCausalLM.from_pretrained(rep, lut_shards=s.base, placement="disk"),
        "moe_table.weight, host": lambda: TPMoLEForCausalLM.from_pretrained(rep),
        "pytorch_model.bin folder": lambda: TPMoLEForCausalLM.from_pretrained(os.path.join(s.tmp, "rep_bin")),
        "single-process lut_file, disk": lambda: TPMoLEForCausalLM.from_pretrained(
            rep, lut_file=os.path.join(s.tmp, "single.safetensors"), placement="disk"),
        "train-form folder": lambda: TPMoLEForCausalLM.from_pretrained(os.path.join(s.tmp, "train")),
    }
    out = {}
    for name, load in loads.items():
        tp = load()
        out[name] = dict(s.compare(tp), shape=list(tp.lut.shape), row_bytes=tp.lut.row_bytes)
        if name == "lut_shards, disk":  # what one decode token reads from this rank's file
            tp.lut.reset_stats()
            tp.lut.drop_cached_rows()  # the rows s.compare's steps left in the reader's row cache
            seq = tp.generate(s.prompt[:1, :1], max_new_tokens=2)  # the prompt pass and one decode step
            out[name]["bytes_read"] = tp.lut.stats.bytes_read["disk"]
            out[name]["tokens_read"] = len(set(seq[0, :2].tolist()))  # their ids: a repeated one's row is in a slot
        tp.lut.close()
    return out


def sc_wrong_rank(s):
    # Every rank opens rank 0's shard: rank 1.. must refuse it, and rank 0 must fail too.
    rep = os.path.join(s.tmp, "rep")
    return _error_of(lambda: TPMoLEForCausalLM.from_pretrained(rep, lut_file=shard_file(s.base, 0, s.world)))


def sc_mixed_tables(s):
    # Rank 0 opens its shard of one write, the others theirs of another write of the same table.
    rep = os.path.join(s.tmp, "rep")
    base = s.base if s.rank == 0 else os.path.join(s.tmp, "again.safetensors")
    return _error_of(lambda: TPMoLEForCausalLM.from_pretrained(rep, lut_file=shard_file(base, s.rank, s.world)))


def sc_other_world(s):
    rep = os.path.join(s.tmp, "rep")
    four = os.path.join(s.tmp, "four.safetensors")
    return _error_of(lambda: TPMoLEForCausalLM.from_pretrained(rep, lut_file=shard_file(four, s.rank, 4)))


# Configs with a size some world size cannot split (the rest of CFG splits over 2 and 4 ranks).
INDIVISIBLE = {"kv_heads_1": dict(CFG, num_key_value_heads=1),
               "heads_6": dict(CFG, hidden_size=48, num_attention_heads=6, num_key_value_heads=6),
               "hidden_18": dict(CFG, hidden_size=18, num_attention_heads=3, num_key_value_heads=3, intermediate_size=36),
               "ffn_66": dict(CFG, intermediate_size=66)}


def sc_indivisible(s):
    out = {}
    for name, kw in INDIVISIBLE.items():
        model = MoLEForCausalLM(MoLEConfig(**kw)).eval()
        out[name] = _error_of(lambda model=model: TPMoLEForCausalLM.from_model(model))
    return out


def sc_other_prompts(s):
    tp = TPDenseForCausalLM.from_model(s.train)
    return _error_of(lambda: tp.generate(s.prompt + s.rank, max_new_tokens=2))


def sc_collectives(s):
    """Collectives of a prompt pass and two decode steps (generate, 3 new tokens), MoLE TP vs dense TP."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, tp in (("mole", TPMoLEForCausalLM.from_model(s.single)), ("dense", TPDenseForCausalLM.from_model(s.train))):
        tp.generate(s.prompt, max_new_tokens=1)  # warm-up outside the count
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            tp.generate(s.prompt, max_new_tokens=3)
        counts = {}
        for e in prof.events():
            if e.name.startswith("c10d::"):
                counts[e.name] = counts.get(e.name, 0) + 1
        out[name] = counts
    return out


def sc_demo(s):
    """``run_demo`` (what ``mole-kernels demo --tensor-parallel N`` runs) at tiny sizes; rank 0 prints."""
    import argparse
    import contextlib
    import io

    from mole_kernels._demo_tp import run_tensor_parallel_demo as run_demo

    args = argparse.Namespace(vocab=128, hidden=32, layers=2, experts=2, heads=4, batch=1, prompt_len=4, new_tokens=4,
                              repeats=1, seed=0, cpu=True, threads=1, save_model=None, tensor_parallel=s.world)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = run_demo(args)
    return dict(rc=rc, stdout=out.getvalue())


def sc_peer_dies(s):
    """The last rank exits in the middle of a job; the others must fail at their next collective, fast."""
    tp = TPDenseForCausalLM.from_model(s.train)
    if s.rank == s.world - 1:
        os._exit(3)
    return _error_of(lambda: tp.generate(s.prompt, max_new_tokens=4))


SCENARIOS = {
    2: ["mole_host", "mole_disk_nf4", "dense", "shards", "wrong_rank", "mixed_tables", "other_world",
        "indivisible", "other_prompts", "collectives", "demo", "peer_dies"],
    4: ["mole_host", "shards", "wrong_rank", "indivisible"],
}


def _worker(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    results = {}
    path = os.path.join(tmp, f"rank{rank}.json")
    s = _Setup(rank, world, tmp)
    for name in SCENARIOS[world]:
        try:
            results[name] = globals()["sc_" + name](s)
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results[name] = {"unexpected": traceback.format_exc()}
        with open(path, "w") as f:  # after each scenario: what ran survives a later crash
            json.dump(results, f)
    dist.destroy_process_group()


# ---------------------------------------------------------------- the jobs ---------------------------


def _run_job(world, tmp):
    # A fork server imports torch and the package once and forks every rank from that clean process
    # (no threads, nothing initialised: safe to fork), instead of N fresh interpreters importing them.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "mole_kernels.model.tensor_parallel"])
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp)), daemon=True) for r in range(world)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, JOB_TIMEOUT_S - (time.perf_counter() - t0)))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r in range(world):
        path = os.path.join(tmp, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
        else:
            results.append({})
    return dict(results=results, hung=hung, exitcodes=[p.exitcode for p in procs],
                seconds=time.perf_counter() - t0)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    out = {}

    def get(world):
        if world not in out:
            out[world] = _run_job(world, tmp_path_factory.mktemp(f"tp{world}"))
            assert not out[world]["hung"], f"ranks {out[world]['hung']} still running after {JOB_TIMEOUT_S} s"
        return out[world]

    return get


def _per_rank(jobs, world, name):
    job = jobs(world)
    rows = []
    for r, res in enumerate(job["results"]):
        assert name in res, f"rank {r} never finished scenario {name!r} (exit codes {job['exitcodes']})"
        assert "unexpected" not in res[name], f"rank {r}, {name}:\n{res[name]['unexpected']}"
        rows.append(res[name])
    return rows


def _check_close(row, what):
    """Tokens equal; logits within 2E of the single-process model's, and (float LUT) within 2E of exact."""
    assert row["same_tokens"], f"{what}: greedy tokens differ from the single-process model"
    e = row["e32"]
    assert row["max_dlogit"] <= 2 * e, f"{what}: logits differ by {row['max_dlogit']:.3g} > 2E = {2 * e:.3g}"
    if not row["quantized"]:  # a quantized LUT is far from exact by design; only the comparison above applies
        assert row["tp_err"] <= 2 * e, f"{what}: TP logits are {row['tp_err']:.3g} from exact, more than 2E = {2 * e:.3g}"


# ---------------------------------------------------------------- the tests --------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_tokens_and_logits_match_single_process(jobs, world):
    for r, row in enumerate(_per_rank(jobs, world, "mole_host")):
        _check_close(row, f"N={world}, rank {r}")


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_holds_its_columns_and_1_over_n_of_the_lut(jobs, world):
    rows = _per_rank(jobs, world, "mole_host")
    full = rows[0]["full_nbytes"]
    for r, row in enumerate(rows):
        n = CFG["hidden_size"] // world
        assert row["columns"] == [r * n, (r + 1) * n]
        assert row["held"] == row["nbytes"] == full // world, f"rank {r}: held {row['held']} of {full} bytes"
        assert row["row_bytes"] * world == row["full_row_bytes"]


def test_quantized_disk_shards_match_single_process_quantized(jobs):
    for r, row in enumerate(_per_rank(jobs, 2, "mole_disk_nf4")):
        assert (row["format"], row["placement"]) == ("nf4", "disk")
        assert row["row_bytes"] * 2 == row["full_row_bytes"]  # nf4 block 8: every row halves exactly
        _check_close(row, f"nf4 rank {r}")


def test_dense_tp_matches_dense(jobs):
    assert all(row["same_tokens"] for row in _per_rank(jobs, 2, "dense"))


@pytest.mark.parametrize("world", [2, 4])
def test_loading_from_folders_tables_and_shards(jobs, world):
    V, L, E, D = CFG["vocab_size"], CFG["num_hidden_layers"], CFG["num_experts"], CFG["hidden_size"]
    for r, loads in enumerate(_per_rank(jobs, world, "shards")):
        assert set(loads) == {"lut_shards, disk", "moe_table.weight, host", "pytorch_model.bin folder",
                              "single-process lut_file, disk", "train-form folder"}
        for name, row in loads.items():
            assert row["shape"] == [V, L, E, D // world], name
            _check_close(row, f"rank {r}, {name}")
        # A decode token reads one contiguous row of D/N values per layer and expert (float32): the prompt pass
        # (1 token) and one decode step read 2 tokens' rows (1 when the step's token is the prompt's).
        row = loads["lut_shards, disk"]
        assert row["tokens_read"] in (1, 2) and row["bytes_read"] == row["tokens_read"] * L * E * (D // world) * 4


def _assert_error_everywhere(rows, *needles, fast=None):
    for r, row in enumerate(rows):
        assert row["error"] is not None, f"rank {r} raised nothing"
        for needle in needles:
            assert needle in row["error"], f"rank {r}: {needle!r} not in {row['error']!r}"
        if fast is not None:
            assert row["seconds"] < fast, f"rank {r} took {row['seconds']:.1f} s to fail"


@pytest.mark.parametrize("world", [2, 4])
def test_opening_another_ranks_shard_fails_on_every_rank(jobs, world):
    rows = _per_rank(jobs, world, "wrong_rank")
    _assert_error_everywhere(rows, "ValueError", "holds rank 0's columns", "this is rank 1", fast=PG_TIMEOUT_S / 2)


def test_shards_of_different_writes_fail_on_every_rank(jobs):
    _assert_error_everywhere(_per_rank(jobs, 2, "mixed_tables"), "ValueError", "LUT shards", "differ between ranks",
                             fast=PG_TIMEOUT_S / 2)


def test_shards_for_another_world_size_fail_on_every_rank(jobs):
    _assert_error_everywhere(_per_rank(jobs, 2, "other_world"), "ValueError", "is a shard for 4 ranks",
                             fast=PG_TIMEOUT_S / 2)


@pytest.mark.parametrize("world", [2, 4])
def test_world_size_must_divide_heads_hidden_and_ffn(jobs, world):
    order = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")  # checked in this order
    for r, cases in enumerate(_per_rank(jobs, world, "indivisible")):
        for name, row in cases.items():
            cfg = MoLEConfig(**INDIVISIBLE[name])
            first = next((k for k in order if getattr(cfg, k) % world), None)
            if first is None:
                assert row["error"] is None, (world, name, row)
            else:
                assert row["error"] is not None and f"the world size must divide {first}=" in row["error"], \
                    (world, r, name, row)


def test_generate_with_other_arguments_on_one_rank_fails_on_every_rank(jobs):
    _assert_error_everywhere(_per_rank(jobs, 2, "other_prompts"), "other arguments than rank 0",
                             fast=PG_TIMEOUT_S / 2)


def test_no_collective_beyond_the_dense_tp_models(jobs):
    L = CFG["num_hidden_layers"]
    for counts in _per_rank(jobs, 2, "collectives"):
        assert counts["mole"] == counts["dense"]
        # 3 passes (the prompt and two decode steps) x L layers x (attention + MLP)
        assert counts["mole"]["c10d::allreduce_"] == 3 * L * 2
        others = {k: v for k, v in counts["mole"].items() if k != "c10d::allreduce_"}
        assert set(others) == {"c10d::allgather_"}, others  # generate's two argument/token checks only


def test_demo_prints_the_table_on_rank_0_with_tokens_equal_to_one_process(jobs):
    rows = _per_rank(jobs, 2, "demo")
    assert [r["rc"] for r in rows] == [0, 0]
    assert rows[1]["stdout"] == ""
    lines = rows[0]["stdout"].splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("per rank"))
    per_rank = lines[at + 2:lines.index("", at)]
    assert [ln[:40].strip() for ln in per_rank] == [
        "MoLE, LUT on host", "MoLE, LUT on disk", "MoLE, LUT on host (bfloat16)", "MoLE, LUT on host (fp8_e4m3, block 16)",
        "MoLE, LUT on host (nf4, block 16)", "dense baseline"]
    assert all(ln.split()[-1] == "yes" for ln in per_rank), "\n".join(per_rank)
    # LUT held on each rank: half of the float32 table [128, 2, 2, 32] (64 KiB)
    assert "32.0 KiB / 32.0 KiB" in per_rank[0] and "32.0 KiB / 32.0 KiB" in per_rank[1]
    assert any(ln.startswith("MoLE, LUT on host (nf4, block 16)") for ln in lines[:at])  # the demo's own table


def test_a_rank_that_dies_makes_the_others_fail_fast(jobs):
    job = jobs(2)
    assert job["exitcodes"][1] == 3
    row = job["results"][0]["peer_dies"]
    assert row.get("error"), row
    assert row["seconds"] < PG_TIMEOUT_S / 2, f"rank 0 waited {row['seconds']:.1f} s for a dead peer"
