"""transformers' `generate` on the MoLE model against the dense baseline, both through transformers
(issue 21's goal: MoLE <= 1.05x the dense model per decoded token, batch 1 and 8, CPU).

Both providers are `mole_kernels.integrations.hf.MoleForCausalLM` wrapping a core model with the
same weights: `dense` (DenseForCausalLM.from_mole: no router, no LUT term), `mole-host` (the LUT in
RAM) and `mole-disk` (the LUT in a file, page cache warm). Each round runs every provider in turn
(interleaved, the order rotating): greedy `generate` of NEW tokens after the same PROMPT-token
prompt, a stopping criterion stamping the time at every token; the decode time per token is the
median step interval of the run (a preemption by the shared machine moves one interval, not the
run), in this process's CPU time (the work done, robust to other processes on a shared machine)
and in wall time; the whole time / NEW is reported too. Medians over the rounds; ratios to `dense` of the
same rounds. Shapes as bench_decode.py (`demo`: the demo's model, fp32 LUT; `160M-4E`: the
paper's layers and widths, vocabulary scaled to 4,096, bf16 LUT), float32 weights, one thread.

    python bench/bench_hf_generate.py            # the table (markdown), as bench/RESULTS.md shows it
    pytest bench/bench_hf_generate.py            # pytest-benchmark, the same numbers in extra_info
"""
import os
import statistics
import sys
import tempfile
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import SMOKE, num_threads  # noqa: E402

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install "
                                                          "'transformers>=5.16.1,<5.20')")
from mole_kernels import DenseForCausalLM, LookupTable, MoLEConfig, MoLEForCausalLM  # noqa: E402
from mole_kernels.integrations.hf import MoleForCausalLM  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

# name -> (V, L, D, FFN, heads, kv heads, E, LUT dtype)
SHAPES = {"demo": (2048, 4, 128, 512, 4, 2, 4, torch.float32),
          "160M-4E": (4096, 12, 768, 3072, 12, 12, 4, torch.bfloat16)}
PROVIDERS = ("dense", "mole-host", "mole-disk")
if SMOKE:
    CASES, ROUNDS, PROMPT, NEW = [("demo", 1)], 1, 4, 3
else:
    CASES, ROUNDS, PROMPT, NEW = [("demo", 1), ("demo", 8), ("160M-4E", 1), ("160M-4E", 8)], 15, 16, 32


def models(shape, tmpdir):
    V, L, D, F, H, Hkv, E, lut_dtype = SHAPES[shape]
    cfg = MoLEConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                     num_key_value_heads=Hkv, num_experts=E)
    torch.manual_seed(0)
    mole = MoLEForCausalLM(cfg, reparameterized=True).eval()
    out = {"dense": MoleForCausalLM.from_model(DenseForCausalLM.from_mole(mole).eval())}
    lut = torch.empty(cfg.lut_shape, dtype=lut_dtype).uniform_(-0.02, 0.02)
    for tier in ("host", "disk"):
        m = MoLEForCausalLM(cfg, reparameterized=True)
        m.load_state_dict(mole.state_dict(), strict=True, assign=True)  # shares the weights
        path = os.path.join(tmpdir, f"{shape}-lut.safetensors") if tier == "disk" else None
        m.set_lut(LookupTable.from_tensor(lut, tier, path=path) if path else LookupTable.from_tensor(lut, tier))
        out["mole-" + tier] = MoleForCausalLM.from_model(m.eval())
    return cfg, out


class _StepClock(StoppingCriteria):
    """Stamps the time each time generate checks its stopping criteria: once per generated token, so
    consecutive stamps are one whole decode step (the model's forward and transformers' loop around it).
    Two clocks: wall time, and this process's CPU time (the work done, whatever else runs on the
    machine: with one torch thread, and the disk tier's reader threads counted too)."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def __call__(self, input_ids, scores, **kwargs):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _median_step_ms(stamps):
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])) * 1e3


def measure(shape, B, rounds=ROUNDS, prompt=PROMPT, new=NEW):
    """{provider: {"cpu": ms/token, "wall": ms/token, "whole": ms/token}} medians over the rounds, and
    the same divided by dense's.

    A round runs every provider's greedy generate once (the order rotating). A run's decode time per
    token is the median of its NEW - 1 step intervals (so a moment when the shared machine preempts
    us moves one interval, not the run), in CPU time and in wall time; whole: the run's wall time /
    NEW (its prefill included)."""
    with tempfile.TemporaryDirectory(prefix="mole_hf_bench_") as tmp:
        cfg, ms = models(shape, tmp)
        g = torch.Generator().manual_seed(B)
        ids = torch.randint(0, cfg.vocab_size, (B, prompt), generator=g)
        mask = torch.ones_like(ids)

        def gen(model):
            clock = _StepClock()
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
            return dict(cpu=_median_step_ms(clock.cpu), wall=_median_step_ms(clock.wall),
                        whole=(time.perf_counter() - t0) / new * 1e3)

        for m in ms.values():  # warm-up: lazy buffers, first-call costs
            gen(m)
        runs = {p: [] for p in PROVIDERS}
        order = list(PROVIDERS)
        for _ in range(rounds):
            for p in order:
                runs[p].append(gen(ms[p]))
            order.append(order.pop(0))
        for m in ms.values():
            if m.lut is not None:
                m.lut.close()
    med = {p: {k: statistics.median(r[k] for r in runs[p]) for k in ("cpu", "wall", "whole")} for p in PROVIDERS}
    ratios = {p: {k: med[p][k] / med["dense"][k] for k in med[p]} for p in PROVIDERS}
    return med, ratios


@pytest.fixture(scope="module")
def one_thread():
    with num_threads(1):
        yield


@pytest.mark.parametrize("shape,B", CASES, ids=[f"{s}-B{b}" for s, b in CASES])
def test_hf_generate_vs_dense(benchmark, one_thread, shape, B):
    result = {}
    benchmark.pedantic(lambda: result.update(zip(("ms", "ratios"), measure(shape, B))), rounds=1, iterations=1)
    benchmark.group = "hf-generate-vs-dense"
    benchmark.extra_info.update(
        provider="interleaved", op="hf-generate-vs-dense", shape=f"{shape}-B{B}", B=B, prompt=PROMPT, new=NEW,
        rounds=ROUNDS, transformers=transformers.__version__,
        ms_per_token={p: {k: round(x, 4) for k, x in v.items()} for p, v in result["ms"].items()},
        vs_dense={p: {k: round(x, 4) for k, x in v.items()} for p, v in result["ratios"].items()})


def main():
    """Measures every case and writes the section bench/report.py appends to bench/RESULTS.md."""
    import datetime
    import platform
    import subprocess

    torch.set_num_threads(1)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hf_generate.md")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(out)).stdout.strip() or "unknown"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()[0]
    lines = [f"## transformers generate: MoLE vs dense (CPU, {when})", "",
             f"`python bench/bench_hf_generate.py` on {platform.node() or 'unknown'} ({os.cpu_count()} CPUs), "
             f"commit {commit}, transformers {transformers.__version__}, torch {torch.__version__}, 1 thread; "
             f"greedy `generate` of {NEW} tokens after a {PROMPT}-token prompt, {ROUNDS} interleaved rounds "
             "(medians). Decode ms/token: a run's median interval between consecutive tokens (stamped by a "
             "stopping criterion: the model's step and transformers' loop around it), in this process's CPU time "
             "(the work done, whatever else the shared machine runs) and in wall time; whole: a run's wall time / "
             "tokens, prefill included. Ratios: provider / dense in the same rounds (goal: MoLE <= 1.05x).", "",
             "| shape | B | provider | decode ms/token (CPU) | vs dense (CPU) | decode ms/token (wall) | vs dense (wall) "
             "| vs dense (whole generate, wall) |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for shape, B in CASES:
        med, ratios = measure(shape, B)
        for p in PROVIDERS:
            m, r = med[p], ratios[p]
            lines.append(f"| {shape} | {B} | {p} | {m['cpu']:.3f} | {r['cpu']:.3f}x | {m['wall']:.3f} | {r['wall']:.3f}x "
                         f"| {r['whole']:.3f}x |")
            print(lines[-1], flush=True)
    lines += ["", f"1-minute load average: {load0:.1f} before, {os.getloadavg()[0]:.1f} after (2 CPUs shared "
                  "with other work: the interleaving makes it hit every provider alike)."]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out} (bench/report.py appends it to bench/RESULTS.md)")


if __name__ == "__main__":
    main()
