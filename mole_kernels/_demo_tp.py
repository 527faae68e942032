"""`mole-kernels demo --tensor-parallel N` under torchrun: the demo's table for the tensor-parallel models.

Next to the single-process demo (_demo.py), whose rows, table and prompt it reuses; the model layer
(mole_kernels.model.tensor_parallel) knows nothing of it.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from . import host_allocations
from ._demo import _Entry, _print_table, demo_config, format_label, zipf_prompt
from ._format import human_bytes as _human
from .model import DenseForCausalLM, MoLEForCausalLM
from .model.tensor_parallel import (TPDenseForCausalLM, TPMoLEForCausalLM, _all_gather_object, _on_every_rank,
                                    check_tensor_parallel, init_tensor_parallel, write_sharded_tables)
from .quant import canonical_format, default_block_size
from .table import LookupTable

_DEMO_LEGEND = """\
Columns as in `mole-kernels demo` (medians over {repeats} interleaved runs, each {batch} x {new} tokens after a
{prompt}-token prompt), for the {world}-rank tensor-parallel models: rank 0's times (every rank generates);
'vs dense' over the tensor-parallel dense baseline ('~': within the run-to-run spread); max|dlogit| and
the tokens against the train form (in one process, not timed); LUT/token: bytes one rank read; VRAM/RAM:
the table one rank holds (the exact-size memory it allocated, measured; a disk table's file is not counted). Per layer, TP MoLE does the dense TP model's
collectives (one all-reduce after attention, one after the MLP) and no other; here one all-reduce of
{batch} x {hidden} values takes {allreduce} (median of 50) and a decode step does {per_step} of them.
Per rank: each rank's LUT bytes as measured on it (disk: its shard file's table), next to the same LUT
(dtype, format, block) in one process, and whether the greedy tokens equal that single-process model's. A
quantized rank's rows hold D/N values with their scales and 16-byte padding: a little more than 1/N of one process's rows."""


def run_tensor_parallel_demo(args) -> int:
    """``torchrun --standalone --nproc-per-node N -m mole_kernels demo --tensor-parallel N``: the
    single-process demo's table for the tensor-parallel models (every rank runs this; rank 0 prints).

    ``args``: the demo's arguments (``mole-kernels demo``: sizes, batch, prompt_len, new_tokens,
    repeats, seed, cpu, threads, save_model) and ``tensor_parallel`` (N, the number of processes
    torchrun started). Rank 0 builds the seeded model, writes it as a checkpoint folder and its LUT
    as N per-rank shard files (:func:`write_sharded_tables`); every rank then loads its part (the
    shards on each tier, and the single-process table sliced into bf16, fp8 and nf4 tables) and
    generates. Rank 0 also runs the same LUTs in one process, interleaved with the TP runs.
    Returns 0 when every TP model's greedy tokens equal the single-process model's, else 1.
    """
    N = args.tensor_parallel
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"demo --tensor-parallel {N}: launch it with torchrun: `torchrun --standalone "
                         f"--nproc-per-node {N} -m mole_kernels demo --tensor-parallel {N}`")
    cfg = demo_config(args)
    owns_group = not dist.is_initialized()
    group = init_tensor_parallel("gloo" if args.cpu else None)
    try:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if world != N:
            raise ValueError(f"demo --tensor-parallel {N} was launched with {world} processes (torchrun "
                             f"--nproc-per-node {N})")
        check_tensor_parallel(cfg, world)
        on_gpu = torch.cuda.is_available() and not args.cpu
        dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        torch.set_num_threads(args.threads or 1)  # 1 thread per rank on a CPU: the ranks share its cores
        B, S, T, R = args.batch, args.prompt_len, args.new_tokens, args.repeats
        say = print if rank == 0 else (lambda *a, **k: None)
        say(f"MoLE tensor-parallel demo: {world} ranks ({dist.get_backend(group)} on {dev.type}), "
            f"V={cfg.vocab_size} L={cfg.num_hidden_layers} E={cfg.num_experts} D={cfg.hidden_size} "
            f"FFN={cfg.intermediate_size} heads={cfg.num_attention_heads}/{cfg.num_key_value_heads}, batch {B}, "
            f"prompt {S}, {T} new tokens, {R} runs per model (seed {args.seed}, random weights, "
            f"{torch.get_num_threads()} CPU thread(s) per rank, {os.cpu_count()} CPUs)")
        torch.manual_seed(args.seed)
        train = MoLEForCausalLM(cfg, init_std=0.1).to(dev).eval()
        prompt = zipf_prompt(cfg.vocab_size, (B, S), dev)  # the same on every rank (same seed)
        lut32 = None  # rank 0: the single-process LUT every comparison is made from

        def write_files():  # rank 0: the single-process files every rank loads its part of
            nonlocal lut32
            if rank != 0:
                return None
            if args.save_model:
                train.save_pretrained(args.save_model)
            tmp = tempfile.mkdtemp(prefix="mole_tp_demo_")
            single = train.reparameterize(placement="host", dtype=torch.float32, device=dev, progress=False)
            single.save_pretrained(os.path.join(tmp, "rep"))
            single.lut.save(os.path.join(tmp, "lut.safetensors"))
            shards = write_sharded_tables(single.lut, os.path.join(tmp, "lut.safetensors"), world)
            lut32 = single.lut.read()
            say(f"re-parameterized into a {list(cfg.lut_shape)} float32 LUT ({_human(single.lut.nbytes)}); wrote "
                f"{tmp}/rep (official layout) and {world} per-rank tables {os.path.basename(shards[0])}, ... "
                f"({_human(os.path.getsize(shards[0]))} each; removed when the demo ends)")
            return tmp

        files = [_on_every_rank(group, world, "demo", write_files)]
        dist.broadcast_object_list(files, src=0, group=group)
        tmp = files[0]
        # lut_file: the single-process table, and the base name of its shards (lut.tp{r}-of-{N}.safetensors)
        rep, lut_file = os.path.join(tmp, "rep"), os.path.join(tmp, "lut.safetensors")
        try:
            with contextlib.ExitStack() as tables, torch.no_grad():
                def block(fmt):  # a block dividing D/N: one process quantizes exactly as the ranks do
                    return None if fmt is None else default_block_size(canonical_format(fmt), cfg.hidden_size // world)

                # Every rank lists every row (the same random run order everywhere); None: not run on this
                # rank (the single-process rows run on rank 0 alone).
                tp_rows, one_rows, helds = [], [], []
                one_inf = None

                def add(tier, dtype, fmt, make):
                    nonlocal one_inf
                    name = f"MoLE, LUT on {tier}" + (f" ({format_label(fmt, block(fmt))})" if fmt else
                                                     "" if dtype == torch.float32 else f" ({str(dtype)[6:]})")
                    before = host_allocations()["bytes"]
                    tp = make()
                    tables.callback(tp.lut.close)
                    held = host_allocations()["bytes"] - before if tier == "host" else tp.lut.nbytes
                    tp_rows.append(_Entry(name, tp, table=tp.lut, vram=held if tier == "device" else 0,
                                          ram=held if tier == "host" else 0))
                    helds.append(_all_gather_object(held, group, world))
                    one = None
                    if rank == 0:
                        table = tables.enter_context(LookupTable.from_tensor(
                            lut32.to(dtype), tier, dev, format=fmt, block_size=block(fmt)))
                        one_inf = one_inf or train._inference_form(table)
                        one = _Entry(name, one_inf, table=table)
                    one_rows.append(one)

                for tier in (["device"] if on_gpu else []) + ["host", "disk"]:  # this rank's shard file
                    add(tier, torch.float32, None, lambda tier=tier: TPMoLEForCausalLM.from_pretrained(
                        rep, device=dev, placement=tier, lut_shards=lut_file))
                for dtype, fmt in ((torch.bfloat16, None), (torch.float32, "fp8_e4m3"), (torch.float32, "nf4")):
                    add("host", dtype, fmt, lambda dtype=dtype, fmt=fmt: TPMoLEForCausalLM.from_pretrained(
                        rep, device=dev, placement="host", lut_file=lut_file, lut_dtype=dtype, lut_format=fmt,
                        block_size=block(fmt)))  # each rank slices the single-process table
                tp_rows.append(_Entry("dense baseline", TPDenseForCausalLM.from_model(train)))
                one_rows.append(_Entry("dense baseline", DenseForCausalLM.from_mole(train)) if rank == 0 else None)
                # The train form is the reference (tokens, max|dlogit|), not a row: it runs in one process, and
                # a "vs dense" against the tensor-parallel dense model would compare unlike things.
                runs = tp_rows + one_rows

                ref = [train.generate(prompt, max_new_tokens=T).cpu() if rank == 0 else None]
                dist.broadcast_object_list(ref, src=0, group=group)
                ref_seq = ref[0].to(dev)
                ref_logits = train(ref_seq).logits
                first = {}  # row -> its first run's tokens
                for e in runs:
                    if e is not None:
                        e.warm_up(prompt)
                order = random.Random(args.seed)  # a new order each round, the same on every rank
                for r in range(R):
                    for i in (range(len(runs)) if r == 0 else order.sample(range(len(runs)), len(runs))):
                        if runs[i] is not None:
                            seq = runs[i].timed(prompt, T, dev, count_bytes=r == 0)
                            first.setdefault(i, seq)
                for i, e in enumerate(tp_rows):  # collective: every rank, in the same order
                    e.same = torch.equal(first[i], ref_seq)
                    if e.table is not None:
                        e.delta = (e.model(ref_seq).logits - ref_logits).abs().max().item()
                same = [one is not None and torch.equal(first[i], first[i + len(tp_rows)])
                        for i, one in enumerate(one_rows)]

                # What the TP rows pay per step for communication here: 2L all-reduces of B x D values.
                buf, times = torch.zeros(B, cfg.hidden_size, device=dev), []
                for i in range(60):
                    dist.barrier(group)
                    t0 = time.perf_counter()
                    dist.all_reduce(buf, group=group)
                    if on_gpu:
                        torch.cuda.synchronize(dev)
                    if i >= 10:
                        times.append(time.perf_counter() - t0)
            if rank == 0:
                _print_table(tp_rows, {e.name: statistics.median(e.times) for e in tp_rows}, B, S, T)
                head = (f"{'per rank':40s} {'ms/token: 1 process':>20s} {f'TP {world}':>8s} "
                        f"{'LUT held: rank 0 / rank 1 / ...':>34s} {'1 process':>10s} {'same tokens as 1 process':>25s}")
                print(head + "\n" + "-" * len(head))
                for i, one in enumerate(one_rows):
                    lut = "-" if i >= len(helds) else " / ".join(_human(h) for h in helds[i])
                    held_one = "-" if one.table is None else _human(one.table.nbytes)
                    print(f"{one.name:40s} {1000 * statistics.median(one.times) / T:20.2f} "
                          f"{1000 * statistics.median(tp_rows[i].times) / T:8.2f} {lut:>34s} {held_one:>10s} "
                          f"{'yes' if same[i] else 'NO':>25s}")
                print()
                print(_DEMO_LEGEND.format(repeats=R, batch=B, new=T, prompt=S, world=world, hidden=cfg.hidden_size,
                                          allreduce=f"{1000 * sorted(times)[len(times) // 2]:.3f} ms",
                                          per_step=2 * cfg.num_hidden_layers))
            ok = _all_gather_object(all(same), group, world)[0]  # rank 0 compared; every rank exits alike
        finally:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        return 0 if ok else 1
    finally:
        if owns_group:
            dist.destroy_process_group()
