"""Where a MoLE decode step spends more than the dense one: the step timed phase by phase (issue 24).

    python bench/decode_phases.py [--batch 8] [--rounds 21] [--clock cpu|wall] [--probes]

The demo shape of bench/bench_decode.py (its models: `dense` and `mole-host`, the LUT in RAM read by the
fused C++ layer call), one thread, 31 decode steps per run, the two providers interleaved (each round
starts with the other one). A copy of the step's `_hidden` with a clock read between its phases: `pre`
(embedding, rotary tables, the reader's `start`), `attn` (input norm, attention and its residual add),
`norm` (the post-attention norm), `mlp` (the shared MLP), `combine` (MoLE: the layer call, router +
softmax + rows + both adds; dense: `h + mlp`), `post` (the final norm); per-layer phases summed over
the layers. Prints each phase's median us per step and MoLE's difference. `--clock cpu` (default) reads
this thread's CPU time (time.thread_time_ns), steadier on a shared machine; `wall` the wall clock.

`--probes` adds two MoLE providers on the same weights and table, in the same rounds, that tell what the
layer call's time in the step is made of: `mole-rows-cached` reads one token's rows for every id (the same
arithmetic, its rows always in cache; its `pre` also makes those ids), and `mole-prewarmed` runs each
layer's call once, untimed, before the layer's MLP, so the timed call finds its code, tensor metadata,
router weight and rows fetched (the MLP between them streams less than the L2 cache holds; a layer's
attention and MLP together stream more).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench_decode's models, the source tree

import bench_decode as bd  # noqa: E402
from conftest import zipf_ids  # noqa: E402
from mole_kernels import MoLEForCausalLM  # noqa: E402
from mole_kernels.model.layers import _rope  # noqa: E402

PHASES = ["pre", "attn", "norm", "mlp", "combine", "post"]


def timed_hidden(model, acc, clock, probe=None):
    """`model._hidden` with each phase's time added to `acc` (the same operations, in the same order);
    `probe` "rows-cached" or "prewarmed" (see the module docstring) changes a MoLE step as described there."""
    def hidden(input_ids, position_ids, mask, cache=None, cache_idx=None):
        t = clock()
        x = model.model.embed_tokens(input_ids)
        cos, sin = _rope(position_ids, model.config.head_dim, model.config.rope_theta, x.dtype)
        ctx = model._ffn_context(torch.zeros_like(input_ids) if probe == "rows-cached" else input_ids, x)
        h = x
        t1 = clock(); acc["pre"] += t1 - t; t = t1
        for l, layer in enumerate(model.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, mask, cache, l, cache_idx)
            t1 = clock(); acc["attn"] += t1 - t; t = t1
            n = layer.post_attention_layernorm(h)
            t1 = clock(); acc["norm"] += t1 - t; t = t1
            if probe == "prewarmed":  # untimed: the clock skips it
                ctx(l, n, h, h, layer._modules["router"]._parameters["weight"])
                t = clock()
            shared = layer.mlp(n)
            t1 = clock(); acc["mlp"] += t1 - t; t = t1
            h = h + shared if ctx is None else ctx(l, n, h, shared, layer._modules["router"]._parameters["weight"])
            t1 = clock(); acc["combine"] += t1 - t; t = t1
        out = model.model.norm(h)
        acc["post"] += clock() - t
        return out
    return hidden


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="tokens per step (default 8)")
    ap.add_argument("--rounds", type=int, default=21, help="interleaved rounds of 31 steps each (default 21)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="thread CPU time (default) or wall clock")
    ap.add_argument("--probes", action="store_true", help="add mole-rows-cached and mole-prewarmed (see above)")
    args = ap.parse_args()
    if args.batch < 1 or args.rounds < 1:
        ap.error("--batch and --rounds must be >= 1")
    torch.set_num_threads(1)
    clock = time.thread_time_ns if args.clock == "cpu" else time.perf_counter_ns
    cfg, models = bd._models("demo")
    names = ["dense", "mole-host"]
    probes = {"mole-rows-cached": "rows-cached", "mole-prewarmed": "prewarmed"} if args.probes else {}
    for p in probes:  # a model of its own (its own timed step), on mole-host's weights and table
        models[p] = MoLEForCausalLM(cfg, reparameterized=True)
        models[p].load_state_dict(models["mole-host"].state_dict(), strict=True, assign=True)
        models[p].set_lut(models["mole-host"].lut)
        names.append(p)
    acc = {p: dict.fromkeys(PHASES, 0) for p in names}
    for p in names:
        models[p]._hidden = timed_hidden(models[p], acc[p], clock, probes.get(p))
    ids = zipf_ids(cfg.vocab_size, args.batch, batches=bd.STEPS, seed=args.batch)
    runs = {p: bd._Stepper(cfg, models[p], p, args.batch, ids) for p in names}
    for run in runs.values():
        run()  # warm-up
    per = {p: {k: [] for k in PHASES + ["step"]} for p in names}
    order = list(names)
    for _ in range(args.rounds):
        for p in order:
            acc[p].update(dict.fromkeys(PHASES, 0))
            t = clock()
            runs[p]()
            per[p]["step"].append((clock() - t) / bd.STEPS / 1e3)
            for k in PHASES:
                per[p][k].append(acc[p][k] / bd.STEPS / 1e3)
        order.append(order.pop(0))  # the next round starts with the next provider
    print(f"demo shape, B = {args.batch}, {args.clock} clock, us per step (median of {args.rounds} rounds; "
          f"load {os.getloadavg()[0]:.1f}); each MoLE provider's difference to dense in brackets")
    for k in PHASES + ["step"]:
        med = {p: statistics.median(per[p][k]) for p in names}
        print(f"  {k:8s} dense {med['dense']:8.1f}" + "".join(
            f"  {p} {med[p]:8.1f} ({med[p] - med['dense']:+6.1f})" for p in names[1:]))
    for m in models.values():
        if getattr(m, "lut", None) is not None:
            m.lut.close()  # once per model: the probes share mole-host's table, and closing is idempotent


if __name__ == "__main__":
    main()
