"""`mole-kernels demo`: a seeded MoLE model, its LUT on every tier, timed against the baselines.

Runs are interleaved (every model once, then every model again in a new order, ...) so that a
slow moment of a shared machine hits all models alike, and the table shows medians.
"""
from __future__ import annotations

import contextlib
import os
import random
import statistics
import tempfile
import time

import torch

from ._progress import progress_bar
from ._format import human_bytes as _human
from .model import DenseForCausalLM, MoEForCausalLM, MoLEConfig, MoLEForCausalLM
from .table import LookupTable

LEGEND = """\
Columns: medians over {repeats} interleaved runs of each model, each run {batch} x {new} generated
tokens after a {prompt}-token prompt.
  ms/token    a whole generation's time (the prompt's prefill included) / tokens per sequence
  min-max     the fastest and the slowest run in the same unit: how much the machine moved it
  tokens/s    generated tokens of the whole batch per second
  vs dense    ms/token over the dense baseline's (1.00x: as fast as the dense model). A MoLE step
              is the dense step plus, per layer, a router (D x E), a softmax over E, an E-row
              weighted sum and the prefetch's bookkeeping; with the LUT on host here that costs
              {extra} (D={hidden}: a small step, where it shows most); bench/RESULTS.md
              (e2e-decode) compares them at the paper's sizes. '~': this model's min-max range
              overlaps the dense model's, so the difference is within the run-to-run spread (a
              ratio below 1.00x then is noise, not a MoLE model faster than the dense one).
  LUT/token   table bytes read per token, in the prompt's prefill and per decode step. A token's
              rows are L*E*D values ({row} in float32 here). The prompt's ids follow a Zipf law,
              as text does, so some repeat: the host tier (zero-copy) reads a row for every
              token, the disk tier each distinct id of a call once, hence fewer bytes per prompt
              token. Decode reads one row per sequence and step. Quantized tables read packed
              rows with their scales. MoE: the expert weights its router picked, copied per token.
  VRAM/RAM    what the table (MoE: the offloaded experts) holds on the GPU / in host memory; the
              disk tier's file is read on demand (page cache, not counted)
  max|dlogit| largest |logit difference| from the train form on its own greedy continuation
              (fp32 tables: rounding only); '*': the greedy tokens differed
The MoE baseline is a different random model with MoLE's activated parameters."""


def demo_config(args) -> MoLEConfig:
    return MoLEConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=max(1, args.heads // 2), num_experts=args.experts)


def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Entry:
    """One row of the table: how to run the model, and what it read and holds."""

    def __init__(self, name, model, *, table=None, vram=None, ram=None, reset=None, moved=None):
        self.name, self.model, self.table = name, model, table
        self.vram, self.ram = vram, ram
        self.reset = reset or (table.reset_stats if table is not None else None)
        self.moved = moved or ((lambda: sum(table.stats.bytes_read.values())) if table is not None else None)
        self.times, self.prefill_bytes, self.decode_bytes = [], None, None
        self.delta, self.same = None, None

    def generate(self, prompt, new_tokens):
        if self.table is not None:
            self.model.set_lut(self.table)
        return self.model.generate(prompt, max_new_tokens=new_tokens)

    def timed(self, prompt, new_tokens, dev, count_bytes=False):
        """One timed generation; with ``count_bytes``, the bytes it reads beyond the prefill's."""
        if count_bytes and self.reset is not None:
            self.reset()
        _sync(dev)
        t0 = time.perf_counter()
        seq = self.generate(prompt, new_tokens)
        _sync(dev)
        self.times.append(time.perf_counter() - t0)
        if count_bytes and self.moved is not None:
            self.decode_bytes = self.moved() - self.prefill_bytes
        return seq

    def warm_up(self, prompt):
        """A prefill alone (one new token): builds lazy buffers, and counts the prefill's bytes."""
        if self.reset is not None:
            self.reset()
        self.generate(prompt, 1)
        if self.moved is not None:
            self.prefill_bytes = self.moved()


def zipf_prompt(V: int, shape, device) -> torch.Tensor:
    """Token ids drawn from a Zipf law over a random permutation of the vocabulary: like text,
    a prompt repeats some ids (which the deduplicating paths read once)."""
    weights = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.1
    ranks = torch.multinomial(weights, shape[0] * shape[1], replacement=True)
    return torch.randperm(V)[ranks].view(shape).to(device)


def run_demo(args, cfg: MoLEConfig) -> int:
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    # Decoding a small model is a chain of tiny ops: waking a thread pool for each costs more than
    # the op (on a busy machine, milliseconds), so on the CPU one thread is both faster and steadier.
    torch.set_num_threads(args.threads or (1 if dev.type == "cpu" else torch.get_num_threads()))
    B, S, N, R = args.batch, args.prompt_len, args.new_tokens, args.repeats
    print(f"MoLE demo on {dev}: V={cfg.vocab_size} L={cfg.num_hidden_layers} E={cfg.num_experts} "
          f"D={cfg.hidden_size} FFN={cfg.intermediate_size} heads={cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads}, batch {B}, prompt {S}, {N} new tokens, {R} runs per model "
          f"(seed {args.seed}, random weights, {torch.get_num_threads()} CPU thread(s))")
    torch.manual_seed(args.seed)
    train = MoLEForCausalLM(cfg, init_std=0.1).to(dev).eval()
    if args.save_model:
        train.save_pretrained(args.save_model)
        from ._tokenizer import save_tokenizer

        print(f"saved the train-form model to {args.save_model} (input for `mole-kernels reparameterize "
              f"--from {args.save_model} --to OUT`)")
        # Text in, text out with nothing downloaded: `mole-kernels generate --model DIR --prompt ...`.
        print(f"tokenizer: {save_tokenizer(args.save_model, cfg.vocab_size)}")
    t0 = time.perf_counter()
    inf = train.reparameterize(placement="host", dtype=torch.float32, device=dev, progress=not args.quiet)
    row = _human(inf.lut.row_bytes)
    print(f"re-parameterized into a [V, L, E, D] = {list(cfg.lut_shape)} float32 LUT "
          f"({_human(inf.lut.nbytes)}, {row} per token) in {time.perf_counter() - t0:.2f} s")

    # The temporary folder goes on every exit path: an error, Ctrl-C or SIGTERM (the command turns
    # it into KeyboardInterrupt) unwinds through these context managers, tables first.
    with tempfile.TemporaryDirectory(prefix="mole_demo_") as tmp, contextlib.ExitStack() as tables, \
            torch.no_grad():
        lut_file = os.path.join(tmp, "lut.safetensors")
        inf.lut.save(lut_file)
        print(f"saved the LUT to {lut_file} (removed when the demo ends)")
        entries = [_Entry("train form (experts computed)", train)]
        tiers = (["device"] if dev.type == "cuda" else []) + ["host", "disk"]
        # The fp32 LUT on every tier, then smaller host tables (quantized ones hold and move
        # packed rows; the gather dequantizes them to fp32).
        for tier, dtype, fmt in [(t, None, None) for t in tiers] + [("host", torch.bfloat16, None),
                                                                    ("host", None, "int8"), ("host", None, "nf4")]:
            if dtype is None and fmt is None:
                table = tables.enter_context(LookupTable.open(lut_file, placement=tier, device=dev))
            else:
                with LookupTable.open(lut_file, placement="disk", device=dev) as src:
                    table = tables.enter_context(LookupTable.from_tensor(
                        src.read().to(dtype or torch.float32), placement=tier, device=dev, format=fmt))
            name = f"MoLE, LUT on {tier}" + (" (bfloat16)" if dtype else "")
            if fmt is not None:
                name += f" ({format_label(fmt, table.block_size)})"
            entries.append(_Entry(name, inf, table=table, vram=table.nbytes if tier == "device" else 0,
                                  ram=table.nbytes if tier == "host" else 0))
        entries.append(_Entry("dense baseline", DenseForCausalLM.from_mole(train)))
        moe = MoEForCausalLM(cfg, init_std=0.1).to(dev).eval()
        moe.offload_experts()
        entries.append(_Entry(f"MoE top-{cfg.moe_top_k}/{cfg.moe_num_experts}, experts offloaded", moe,
                              ram=moe.host_bytes, moved=lambda: moe.offload_stats.bytes_h2d,
                              reset=lambda: setattr(moe, "offload_stats", type(moe.offload_stats)())))

        prompt = zipf_prompt(cfg.vocab_size, (B, S), dev)
        ref_seq = train.generate(prompt, max_new_tokens=N)
        ref_logits = train(ref_seq).logits
        for e in entries:
            e.warm_up(prompt)
        order = random.Random(args.seed)  # a new order each round: no model always follows the same one
        with progress_bar(R * len(entries), f"timing {len(entries)} models x {R} runs", unit="run",
                          enabled=not args.quiet) as bar:
            for rep in range(R):
                for e in (entries if rep == 0 else order.sample(entries, len(entries))):
                    seq = e.timed(prompt, N, dev, count_bytes=rep == 0)
                    if rep == 0 and e.table is not None:  # a LUT model: the train form's tokens?
                        e.same = torch.equal(seq, ref_seq)
                    bar.update(1)
        for e in entries:  # a LUT model's logits against the train form it was made from
            if e.table is not None:
                inf.set_lut(e.table)
                e.delta = (inf(ref_seq).logits - ref_logits).abs().max().item()
    medians = {e.name: statistics.median(e.times) for e in entries}
    by_name = {e.name: e for e in entries}
    _print_table(entries, medians, B, S, N)
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if dev.type == "cpu" and load > cpus / 2:
        print(f"Note: this machine is busy (1-minute load average {load:.1f} on {cpus} CPUs); other work moved "
              "these timings, see min-max. Medians of more runs (--repeats) steady them.\n")
    print(LEGEND.format(repeats=R, batch=B, new=N, prompt=S, hidden=cfg.hidden_size, row=row,
                        extra=extra_cost(by_name["MoLE, LUT on host"], by_name["dense baseline"], N,
                                         cfg.num_hidden_layers)))
    return 0


def format_label(fmt: str, block_size: int) -> str:
    """How the README names a quantized table: int8 has one scale per row of D values, the others a
    scale per block."""
    return "int8, per-row scale" if fmt == "int8" else f"{fmt}, block {block_size}"


def within_spread(a: "_Entry", b: "_Entry") -> bool:
    """Whether two models' fastest-to-slowest run ranges overlap: their difference is then noise."""
    return min(a.times) <= max(b.times) and min(b.times) <= max(a.times)


def extra_cost(mole: "_Entry", dense: "_Entry", new_tokens: int, layers: int) -> str:
    """What a MoLE step costs beyond the dense step, per layer and token, or that it is within the noise."""
    extra = (statistics.median(mole.times) - statistics.median(dense.times)) / new_tokens / layers
    if extra <= 0 or within_spread(mole, dense):
        return "less than the run-to-run spread shows"
    return f"about {extra * 1e6:.0f} us per layer and token"


def _print_table(entries, medians, B, S, N, dense_entry=None):
    """The demo's table; ``dense_entry``: the baseline of the "vs dense" column (default: the row
    named "dense baseline")."""
    dense_entry = dense_entry or next(e for e in entries if e.name == "dense baseline")
    dense = medians[dense_entry.name]
    head = (f"{'model':40s} {'ms/token':>9s} {'min-max':>13s} {'tokens/s':>9s} {'vs dense':>9s} "
            f"{'LUT/token prefill':>18s} {'decode':>10s} {'VRAM':>9s} {'RAM':>9s} {'max|dlogit|':>12s}")
    print()
    print(head)
    print("-" * len(head))
    for e in entries:
        med = medians[e.name]
        spread = f"{1000 * min(e.times) / N:.2f}-{1000 * max(e.times) / N:.2f}"
        prefill = None if e.prefill_bytes is None else e.prefill_bytes / (B * S)
        decode = None if e.decode_bytes is None else e.decode_bytes / (B * (N - 1))
        delta = "-" if e.delta is None else f"{e.delta:.2e}" + (" *" if e.same is False else "")
        noise = "~" if e is not dense_entry and within_spread(e, dense_entry) else " "
        print(f"{e.name:40s} {1000 * med / N:9.2f} {spread:>13s} {B * N / med:9.1f} {med / dense:7.2f}x{noise} "
              f"{_human(prefill):>18s} {_human(decode):>10s} {_human(e.vram):>9s} {_human(e.ram):>9s} {delta:>12s}")
    print()
