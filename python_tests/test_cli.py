"""The `mole-kernels` command: demo, reparameterize, quality, info, and how it fails.

Most tests call `main` in-process; those about the process itself (one-line errors and exit
status, no torch for --help, Ctrl-C, a closed pipe, a broken install) run a subprocess.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig

import pytest
import torch

import mole_kernels
from mole_kernels import _api, _build_check
from mole_kernels.cli import PROG, _parser, main
from mole_kernels.model import MoLEConfig, MoLEForCausalLM

SMALL = ["--vocab", "97", "--hidden", "32", "--layers", "2", "--experts", "3", "--heads", "2"]
SMALL_DEMO = ["demo", *SMALL, "--prompt-len", "5", "--new-tokens", "4", "--batch", "2", "--repeats", "2"]
SMALL_QUALITY = ["quality", "--vocab", "61", "--hidden", "64", "--ffn", "32", "--layers", "2", "--heads", "4",
                 "--batch", "2", "--seq-len", "5"]
PACKAGE = os.path.dirname(os.path.abspath(mole_kernels.__file__))


def _tiny():
    cfg = MoLEConfig(vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_experts=2)
    return MoLEForCausalLM(cfg, init_std=0.2).eval()


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the demo picks its own thread count


def _lut_folder(out):
    return os.path.dirname(re.search(r"saved the LUT to (\S+)", out).group(1))


def _usual_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _run(args, **kw):
    """`python -m mole_kernels ARGS` in a subprocess, from outside the source tree."""
    kw.setdefault("cwd", os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "mole_kernels", *args], capture_output=True, text=True,
                          timeout=300, **kw)


# ---------------------------------------------------------------- demo --------------------


def test_demo_prints_every_tier_and_baseline(capsys, keep_threads):
    assert main(SMALL_DEMO) == 0
    out = capsys.readouterr().out
    assert "1 CPU thread(s)" in out or torch.cuda.is_available()
    tiers = (["device"] if torch.cuda.is_available() else []) + ["host", "disk"]
    for tier in tiers:
        line = next(l for l in out.splitlines() if l.startswith(f"MoLE, LUT on {tier} "))
        assert float(line.split()[-1]) <= 1e-4  # fp32 LUT: the same logits as the train form
        assert "*" not in line  # and the same greedy tokens
    dense = next(l for l in out.splitlines() if l.startswith("dense baseline"))
    assert " 1.00x " in dense
    assert "experts offloaded" in out and "Columns: medians over 2 interleaved runs" in out
    bf16 = next(l for l in out.splitlines() if "(bfloat16)" in l)
    assert 1e-6 < float(bf16.split()[-1]) < 1.0
    # quantized host tables: logits move more than bf16's, bytes per token shrink (D = 32: one scale per row)
    int8 = next(l for l in out.splitlines() if l.startswith("MoLE, LUT on host (int8, per-row scale)"))
    nf4 = next(l for l in out.splitlines() if l.startswith("MoLE, LUT on host (nf4, block 32)"))
    fp32 = next(l for l in out.splitlines() if l.startswith("MoLE, LUT on host "))
    deltas = [float(l.replace(" *", "").split()[-1]) for l in (bf16, int8, nf4)]
    assert 0 < deltas[0] < deltas[2] < 5.0 and 0 < deltas[1] < deltas[2]

    def per_token(line):  # the prefill and decode "LUT/token" columns, e.g. "1.5 KiB"
        sizes = re.findall(r"([0-9.]+) (B|KiB|MiB)", line)[:2]
        return [float(v) * {"B": 1, "KiB": 1024, "MiB": 1 << 20}[u] for v, u in sizes]

    row = 2 * 3 * 32 * 4  # L * E * D float32 values
    assert per_token(fp32) == [row, row]  # every prompt token and every decode step reads its row
    assert per_token(nf4)[1] < per_token(int8)[1] < per_token(fp32)[1] / 2  # 32 and 48 vs 128 bytes a row
    assert not os.path.exists(_lut_folder(out))  # the temporary LUT is gone
    # the extra cost of a MoLE step is a positive figure or said to be within the noise, never negative
    extra = re.search(r"that costs\s+(about (\d+) us|less than the run-to-run spread)", out)
    assert extra and (extra.group(2) is None or int(extra.group(2)) > 0), out


def test_demo_removes_its_lut_when_it_fails(capsys, monkeypatch, keep_threads):
    from mole_kernels import _demo

    def broken(self, prompt):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(_demo._Entry, "warm_up", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        main(SMALL_DEMO)
    folder = _lut_folder(capsys.readouterr().out)
    assert not os.path.exists(folder)


def test_demo_removes_its_lut_when_terminated(capsys, monkeypatch, keep_threads):
    from mole_kernels import _demo

    monkeypatch.setattr(_demo._Entry, "warm_up", lambda self, prompt: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    assert main(SMALL_DEMO) == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == f"{PROG} demo: interrupted"  # after any progress bar
    assert "Traceback" not in captured.err
    assert not os.path.exists(_lut_folder(captured.out))
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone again


def test_demo_removes_its_lut_on_ctrl_c():
    # The child sets Python's own SIGINT handler first: a process started in the background by a
    # non-interactive shell (`cmd &`, as CI runners may do) inherits SIGINT *ignored*, and so would
    # its children; Ctrl-C at a terminal always arrives with the handler in place.
    child = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv = ['mole_kernels'] + sys.argv[1:]; runpy.run_module('mole_kernels', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", child, *SMALL_DEMO, "--repeats", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    try:
        line = next((line for line in proc.stdout if "saved the LUT to" in line), None)
        assert line is not None, f"the demo ended before saving its LUT: {proc.communicate(timeout=60)[1]}"
        folder = _lut_folder(line)
        assert os.path.isdir(folder)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "python -m mole_kernels demo: interrupted"
    assert "Traceback" not in err
    assert not os.path.exists(folder)


def test_demo_saves_a_model_that_reparameterize_reads(tmp_path, capsys, keep_threads):
    train = tmp_path / "train"
    assert main([*SMALL_DEMO, "--repeats", "1", "--save-model", str(train), "--cpu", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert f"saved the train-form model to {train}" in out
    assert "MoLE demo on cpu:" in out and "2 CPU thread(s)" in out
    assert main(["reparameterize", "--from", str(train), "--to", str(tmp_path / "rep"), "--quiet"]) == 0
    model = MoLEForCausalLM.from_pretrained(train)
    rep = MoLEForCausalLM.from_pretrained(tmp_path / "rep")
    assert not model.is_reparameterized and rep.is_reparameterized
    assert rep.config.lut_shape == (97, 2, 3, 32)


def test_saved_model_files_have_the_usual_permissions(tmp_path):
    _tiny().save_pretrained(tmp_path / "m")
    for name in ("config.json", "model.safetensors"):
        assert os.stat(tmp_path / "m" / name).st_mode & 0o777 == _usual_mode(), name


# ---------------------------------------------------------------- reparameterize ----------


def test_reparameterize_command(tmp_path, capsys):
    m = _tiny()
    m.save_pretrained(tmp_path / "train")
    lut_file = tmp_path / "lut.safetensors"
    rc = main(["reparameterize", "--from", str(tmp_path / "train"), "--to", str(tmp_path / "rep"), "--dtype", "bf16",
               "--quiet", "--lut-file", str(lut_file)])
    assert rc == 0, capsys.readouterr().err
    assert "bfloat16" in capsys.readouterr().out
    rep = MoLEForCausalLM.from_pretrained(tmp_path / "rep", placement="disk")
    assert rep.is_reparameterized and rep.lut.dtype == torch.bfloat16
    ids = torch.randint(0, m.config.vocab_size, (2, 6))
    with torch.no_grad():
        want = m(ids).logits
        got = rep(ids).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert 1e-7 < err <= 2 * 2.0 ** -8  # the bf16 bound of test_model.test_inference_form_half_lut (L=2)
    from mole_kernels.table import LookupTable

    with LookupTable.open(lut_file) as t:
        assert t.shape == m.config.lut_shape and t.dtype == torch.bfloat16
        torch.testing.assert_close(t.read(), rep.lut.read(), rtol=0, atol=0)


def test_reparameterize_command_errors(tmp_path, capsys):
    assert main(["reparameterize", "--from", str(tmp_path / "missing"), "--to", str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    assert main(["reparameterize", "--from", str(tmp_path / "bad"), "--to", str(tmp_path / "out")]) == 2
    assert "JSON object" in capsys.readouterr().err
    m = _tiny()
    m.reparameterize(progress=False).save_pretrained(tmp_path / "rep")
    assert main(["reparameterize", "--from", str(tmp_path / "rep"), "--to", str(tmp_path / "o")]) == 2
    assert "already re-parameterized" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def _snapshot(folder):
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder))}


def test_reparameterize_never_writes_into_its_input(tmp_path, capsys):
    train, out = tmp_path / "train", tmp_path / "out"
    _tiny().save_pretrained(train)
    before = _snapshot(train)
    (tmp_path / "link").symlink_to(train)
    (tmp_path / "weights-link").symlink_to(train / "model.safetensors")
    os.link(train / "config.json", tmp_path / "hard-config")
    cases = [
        (["--to", str(train)], "is (or is inside) --from"),
        (["--to", str(tmp_path / "link")], "is (or is inside) --from"),  # the same folder through a symlink
        (["--to", str(train / "sub")], "is (or is inside) --from"),
        (["--to", str(out), "--lut-file", str(train / "model.safetensors")], "is inside --from"),
        (["--to", str(out), "--lut-file", str(tmp_path / "weights-link")], "is inside --from"),
        (["--to", str(out), "--lut-file", str(tmp_path / "hard-config")], "is the same file as"),  # a hard link
        (["--to", str(out), "--lut-file", str(train / "new.safetensors")], "is inside --from"),
        (["--to", str(out), "--lut-file", str(out / "config.json")], "the output's own config.json"),
        (["--to", str(out), "--lut-file", str(out / "model.safetensors")], "the output's own model.safetensors"),
    ]
    for extra, message in cases:
        assert main(["reparameterize", "--from", str(train), "--quiet", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert _snapshot(train) == before and not out.exists()


def test_reparameterize_output_paths_checked_first(tmp_path, capsys, monkeypatch):
    train = tmp_path / "train"
    _tiny().save_pretrained(train)
    (tmp_path / "a-file").write_text("x")
    # nothing may be loaded before the paths are known to be writable
    monkeypatch.setattr(MoLEForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model first"))
    cases = [
        (["--to", str(tmp_path / "a-file")], "is a file, not a folder"),
        (["--to", str(tmp_path / "no" / "such" / "out")], "does not exist"),
        (["--to", "/proc/mole-out"], "cannot write into"),  # read-only even for root
        (["--to", str(tmp_path / "o"), "--lut-file", str(tmp_path)], "is a folder"),
        (["--to", str(tmp_path / "o"), "--lut-file", str(tmp_path / "nope" / "l.safetensors")], "does not exist"),
    ]
    for extra, message in cases:
        assert main(["reparameterize", "--from", str(train), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


# ---------------------------------------------------------------- quality -----------------


def test_quality_command(tmp_path, capsys):
    md = tmp_path / "quality.md"
    assert main([*SMALL_QUALITY, "--markdown", str(md)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    # the default variants whose block does not divide D = 64 are skipped, saying so
    for skipped in ("fp8-128", "nf4-128", "nf4-768"):
        assert f"{skipped} skipped: block" in out
    assert "| nf4 (block 64) |" in out and "| fp32 |" in out and "| int8 |" in out
    assert "Columns:" in out and "greedy agreement" in out  # the explanations reach the terminal too
    text = md.read_text()
    assert f"- command: `{PROG} {' '.join(SMALL_QUALITY)} --markdown {md}`" in text
    assert "| nf4 (block 64) |" in text and "Columns:" in text
    assert os.stat(md).st_mode & 0o777 == _usual_mode()
    assert os.listdir(tmp_path) == ["quality.md"]  # no temporary file left beside it


def _model_with_text(tmp_path):
    """A tiny train-form folder with a word-level tokenizer.json over its 89 ids, and a text file of them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(5)  # fixed weights: the formats' costs below are the same every run
    m = _tiny()
    folder = tmp_path / "train"
    m.save_pretrained(folder)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, m.config.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    g = torch.Generator().manual_seed(3)
    ids = (torch.rand(40 * 16, generator=g) ** 3 * (m.config.vocab_size - 1)).long() + 1  # skewed: frequent ids
    (tmp_path / "text.txt").write_text(" ".join(f"w{i}" for i in ids.tolist()))
    return m, folder, tmp_path / "text.txt", ids.view(40, 16)


def test_quality_of_a_users_model_on_its_text(tmp_path, capsys):
    """`quality --model --text`: the costs format_costs measures on the same windows, for a plain format, a
    low-bit one and a column-normalised mixed plan (ids ranked by their count in the text)."""
    from mole_kernels.mixed import token_counts
    from mole_kernels.quality import format_costs

    m, folder, text, ids = _model_with_text(tmp_path)
    md = tmp_path / "q.md"
    assert main(["quality", "--model", str(folder), "--text", str(text), "--seq-len", "16", "--quiet",
                 "--variants", "int8,q2-32,norm:int8@8+f4x5,f4x5", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    want = format_costs(m, ids, ["int8", "q2/32", {"plan": [("int8", 8, None), ("f4x5", None, None)],
                                                   "normalize": True}, {"plan": [("f4x5", None, None)]}],
                        counts=token_counts(ids, 89))
    assert len(want) == 5
    for row in want:
        assert f"| {row['name']} | {row['bits']:.3f} | {row['ppl']:.4f} | {100 * row['cost']:+.3f} % |" in out, out
    assert "| LUT | bits/value |" in md.read_text()
    # --max-windows takes the first windows only
    assert main(["quality", "--model", str(folder), "--text", str(text), "--seq-len", "16", "--quiet",
                 "--variants", "q1", "--max-windows", "3"]) == 0
    row = format_costs(m, ids[:3], ["q1"])[1]
    assert f"| {row['name']} | {row['bits']:.3f} | {row['ppl']:.4f} |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--text", "T"], "--text needs --model"),
    (["--model", "M"], "--model needs --text"),
    (["--model", "M", "--text", "T", "--variants", "int8+q2"], "every part but the last names its ids with @N"),
    (["--model", "M", "--text", "T", "--variants", "int8@x+q2"], "@N must be an int"),
    (["--model", "M", "--text", "T", "--variants", "int8@0+q2"], "@N must be >= 1"),
    (["--model", "M", "--text", "T", "--variants", "int8@4+f4x5/32"], "a factored part (f4x5) has no block size"),
    (["--model", "M", "--text", "T", "--variants", "q2/7"], "--variants 'q2/7'"),
    (["--model", "M", "--text", "missing.txt"], "--text 'missing.txt' is not a file"),
])
def test_quality_of_a_users_model_refuses_bad_arguments(tmp_path, capsys, monkeypatch, args, message):
    m, folder, text, _ = _model_with_text(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = [str(folder) if a == "M" else str(text) if a == "T" else a for a in args]
    assert main(["quality", *args, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_reparameterize_below_4_bits_needs_the_quality_gate(tmp_path, capsys):
    m, folder, text, _ = _model_with_text(tmp_path)
    # q3 costs +0.34 % on this model and text (seeded; a random model's cost may have either sign)
    base = ["reparameterize", "--from", str(folder), "--quiet", "--lut-format", "q3"]
    assert main([*base, "--to", str(tmp_path / "a"), "--lut-file", str(tmp_path / "a.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "below 4 bits" in err and "--no-quality-check" in err and "--max-cost" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.safetensors").exists()  # refused before writing
    assert main([*base, "--to", str(tmp_path / "b"), "--lut-file", str(tmp_path / "b.safetensors"),
                 "--max-cost", "0.1", "--quality-text", str(text), "--quality-seq-len", "16"]) == 2
    assert "quality gate: LUT format q3/32 costs +0.34" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main([*base, "--to", str(tmp_path / "c"), "--lut-file", str(tmp_path / "c.safetensors"),
                 "--max-cost", "1000", "--quality-text", str(text), "--quality-seq-len", "16"]) == 0
    assert main([*base, "--to", str(tmp_path / "d"), "--lut-file", str(tmp_path / "d.safetensors"),
                 "--no-quality-check"]) == 0
    from mole_kernels.table import LookupTable

    with LookupTable.open(tmp_path / "c.safetensors") as c, LookupTable.open(tmp_path / "d.safetensors") as d:
        assert c.format == d.format == "q3" and torch.equal(c.read().data, d.read().data)
    assert main([*base, "--to", str(tmp_path / "e"), "--lut-file", str(tmp_path / "e.safetensors"),
                 "--max-cost", "1"]) == 2
    assert "needs both --max-cost and --quality-text" in capsys.readouterr().err


MIXED_PLAN = "norm:int8@8+f4x5"  # column-normalised: the 8 most frequent ids in int8, the rest factored (rank 4, 5 bits)


def _reparameterize_mixed(tmp_path, folder, text, name, *extra):
    """`reparameterize --lut-format MIXED_PLAN` into tmp_path/name and tmp_path/name.safetensors: the exit status."""
    return main(["reparameterize", "--from", str(folder), "--to", str(tmp_path / name), "--quiet",
                 "--lut-file", str(tmp_path / f"{name}.safetensors"), "--quality-seq-len", "16", *extra])


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_reparameterize_a_mixed_plan_then_serve_it(tmp_path, capsys, placement):
    """The user path: `reparameterize --lut-format PLAN` (ids ranked by their count in the quality text, the gate
    passed) -> from_pretrained(lut_file=) on the host or disk tier -> generate, whose logits are those of the same
    model over the float table the mixed file dequantizes to (float64 comparison)."""
    from mole_kernels.mixed import dequantize_mixed, load_mixed, quantize_plan, token_counts
    from mole_kernels.table import LookupTable, MixedLookupTable

    m, folder, text, ids = _model_with_text(tmp_path)
    assert _reparameterize_mixed(tmp_path, folder, text, "rep", "--lut-format", MIXED_PLAN, "--max-cost", "1000",
                                 "--quality-text", str(text)) == 0
    lut_file = tmp_path / "rep.safetensors"
    stored = load_mixed(lut_file)
    assert stored.plan == MIXED_PLAN
    out = capsys.readouterr().out
    assert f"mixed LUT {MIXED_PLAN} ({stored.describe()}) = {stored.bits_per_value:.3f} bits/value" in out, out
    assert re.search(r"; quality gate: [+-]\d+\.\d{3} % perplexity on \S+text.txt, at most 1000 %\)", out), out
    # the file is the plan's table of the fp16 LUT (--dtype's default), ids ranked by their count in the text
    want = quantize_plan(m.compute_lut(dtype=torch.float16, progress=False), token_counts(ids, 89), MIXED_PLAN)
    assert torch.equal(stored.rank, want.rank) and torch.equal(dequantize_mixed(stored), dequantize_mixed(want))

    model = MoLEForCausalLM.from_pretrained(tmp_path / "rep", lut_file=lut_file, placement=placement)
    assert isinstance(model.lut, MixedLookupTable) and model.lut.placement == placement
    ref = MoLEForCausalLM.from_pretrained(tmp_path / "rep")  # the float LUT replaced by the mixed one, dequantized
    ref.set_lut(LookupTable.from_tensor(dequantize_mixed(stored, torch.float32), "host", device="cpu"))
    prompt = torch.tensor([[3, 9, 17, 40, 2], [5, 5, 60, 1, 88]])
    got = model.generate(prompt, max_new_tokens=6, return_logits=True)
    exp = ref.generate(prompt, max_new_tokens=6, return_logits=True)
    assert torch.equal(got.sequences, exp.sequences)
    a, b = torch.stack(list(got.logits)).double(), torch.stack(list(exp.logits)).double()
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()
    # the mixed table matters: the folder's own float LUT gives other logits
    own = MoLEForCausalLM.from_pretrained(tmp_path / "rep").generate(prompt, max_new_tokens=6, return_logits=True)
    assert (torch.stack(list(own.logits)).double() - b).abs().max() > 1e-3
    model.lut.close()


def test_reparameterize_a_mixed_plan_ranks_ids_by_counts_text(tmp_path, capsys):
    """--counts-text ranks the ids (every token of the file) instead of --quality-text; without the gate a plan
    with a factored part needs --no-quality-check."""
    from mole_kernels.mixed import load_mixed

    m, folder, text, ids = _model_with_text(tmp_path)
    counts_text = tmp_path / "counts.txt"
    words = [f"w{i}" for i in range(88, 0, -1) for _ in range(i % 7 + 1)]  # another order than the text's
    counts_text.write_text(" ".join(words))
    assert _reparameterize_mixed(tmp_path, folder, text, "a", "--lut-format", MIXED_PLAN, "--counts-text",
                                 str(counts_text)) == 2
    err = capsys.readouterr().err
    assert "below 4 bits" in err and "--no-quality-check" in err and not (tmp_path / "a").exists()
    assert _reparameterize_mixed(tmp_path, folder, text, "b", "--lut-format", MIXED_PLAN, "--counts-text",
                                 str(counts_text), "--no-quality-check") == 0
    got = load_mixed(tmp_path / "b.safetensors").rank
    assert torch.equal(got, _frequency_rank(torch.tensor([int(w[1:]) for w in words])))
    assert not torch.equal(got, _frequency_rank(ids))


def _frequency_rank(ids):
    """Each id's position in the frequency order of `ids` (0: most frequent; ties in id order)."""
    from mole_kernels.mixed import token_counts

    counts = token_counts(ids, 89)
    rank = torch.empty(89, dtype=torch.int32)
    rank[torch.sort(counts.double(), descending=True, stable=True).indices] = torch.arange(89, dtype=torch.int32)
    return rank


def test_reparameterize_a_mixed_plan_behind_the_quality_gate(tmp_path, capsys):
    """Refused (nothing written) when the plan's measured cost exceeds --max-cost, and without a text."""
    from mole_kernels.mixed import parse_plan, quantize_plan, token_counts
    from mole_kernels.quality import format_costs

    m, folder, text, ids = _model_with_text(tmp_path)
    plan = "norm:int8@8+f1x2"  # rank-1 2-bit rows for all but 8 ids: +0.41 % on this model and text (seeded; a
    # random model's cost may have either sign, so the plan is one whose cost is positive)
    lut = m.compute_lut(dtype=torch.float16, progress=False)  # --dtype's default
    cost = format_costs(m, ids, [quantize_plan(lut, token_counts(ids, 89), plan)], lut=lut)[1]["cost"]
    assert cost > 0.003, cost
    limit = 100 * cost / 2  # percent: half the measured cost, which the gate must refuse
    assert _reparameterize_mixed(tmp_path, folder, text, "a", "--lut-format", plan, "--max-cost", f"{limit}",
                                 "--quality-text", str(text)) == 2
    err = capsys.readouterr().err
    assert f"quality gate: LUT format {plan} (" in err and f"costs {100 * cost:+.3f} % perplexity" in err, err
    assert f"above max_cost = {limit:.3f} %" in err.replace("--max-cost", "max_cost")
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.safetensors").exists()
    assert _reparameterize_mixed(tmp_path, folder, text, "b", "--lut-format", plan,
                                 "--max-cost", f"{100 * cost * 1.01}", "--quality-text", str(text)) == 0
    # no text at all: the plan cannot rank its ids, said before anything is computed
    assert _reparameterize_mixed(tmp_path, folder, text, "c", "--lut-format", plan) == 2
    err = capsys.readouterr().err
    assert "mixed plan" in err and "--counts-text" in err and "--quality-text" in err
    assert _reparameterize_mixed(tmp_path, folder, text, "d", "--lut-format", plan, "--no-quality-check") == 2
    assert not any((tmp_path / n).exists() for n in ("c", "d", "c.safetensors", "d.safetensors"))
    # the Python API: the same gate
    from mole_kernels.quality import QualityError

    with pytest.raises(QualityError, match=re.escape(plan)):
        m.reparameterize(lut_format=plan, max_cost=cost / 2, quality_text=ids, progress=False)
    with pytest.raises(ValueError, match="below 4 bits"):
        m.reparameterize(lut_format=plan, counts=token_counts(ids, 89), progress=False)
    with pytest.raises(ValueError, match="ranks ids by frequency: pass counts="):
        m.reparameterize(lut_format=plan, check_quality=False, progress=False)
    assert parse_plan(plan) == {"plan": [("int8", 8, None), ("f1x2", None, None)], "normalize": True}


@pytest.mark.parametrize("plan, message", [
    ("int8+q2", "every part but the last names its ids with @N"),
    ("int8@x+q2", "@N must be an int"),
    ("int8@0+q2", "@N must be >= 1"),
    ("int9@4+q2", "unknown format 'int9'"),
    ("int8@4+q2/7", "block_size must divide D = 32"),
    ("int8@4+f40x5", "rank must be an int in [1, D = 32]"),
    ("int8@4+f4x5/8", "a factored part (f4x5) has no block size"),
    ("int8@60+nf4@29+q2", "add up to 89 ids but the vocabulary has 89"),
])
def test_reparameterize_refuses_a_bad_plan_naming_it(tmp_path, capsys, monkeypatch, plan, message):
    m, folder, text, _ = _model_with_text(tmp_path)
    monkeypatch.setattr(MoLEForCausalLM, "compute_lut", lambda *a, **k: pytest.fail("computed the LUT first"))
    assert _reparameterize_mixed(tmp_path, folder, text, "a", "--lut-format", plan, "--no-quality-check",
                                 "--counts-text", str(text)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG} reparameterize: error: --lut-format {plan!r}") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match=re.escape(f"lut_format {plan!r}")):  # the Python API: the same parser
        m.reparameterize(lut_format=plan, check_quality=False, counts=torch.ones(89), progress=False)


def test_reparameterize_mixed_plan_argument_errors(tmp_path, capsys):
    m, folder, text, _ = _model_with_text(tmp_path)
    for extra, message in [
        (["--lut-format", "nf5"], "neither a format"),
        (["--lut-format", MIXED_PLAN, "--block-size", "8", "--no-quality-check"], "--block-size does not apply"),
        (["--lut-format", MIXED_PLAN, "--tensor-parallel", "2", "--no-quality-check"], "--tensor-parallel"),
        (["--lut-format", "q2", "--counts-text", str(text), "--no-quality-check"], "--counts-text ranks the ids of a mixed"),
        (["--lut-format", MIXED_PLAN, "--counts-text", str(tmp_path / "nope")], "--counts-text"),
    ]:
        with pytest.raises(SystemExit) if extra[1] == "nf5" else _no_exit():
            assert _reparameterize_mixed(tmp_path, folder, text, "a", *extra) == 2
        assert message in capsys.readouterr().err, extra


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_reparameterize_into_a_mixed_table_in_python(tmp_path):
    """MoLEForCausalLM.reparameterize(lut_format=PLAN, counts=): the plan's table of the model's LUT, served on the
    host tier or from its save_mixed file on the disk tier; save_pretrained writes it dequantized."""
    from mole_kernels.mixed import dequantize_mixed, load_mixed, quantize_plan
    from mole_kernels.table import MixedLookupTable

    torch.manual_seed(2)
    m = _tiny()
    counts = torch.randint(0, 50, (89,))
    want = quantize_plan(m.compute_lut(progress=False), counts, MIXED_PLAN)
    host = m.reparameterize(lut_format=MIXED_PLAN, counts=counts, check_quality=False, progress=False)
    assert isinstance(host.lut, MixedLookupTable) and host.lut.placement == "host"
    assert torch.equal(dequantize_mixed(host.lut.lut), dequantize_mixed(want))
    disk = m.reparameterize(lut_format=MIXED_PLAN, counts=counts, check_quality=False, progress=False,
                            placement="disk", path=tmp_path / "m.safetensors")
    assert disk.lut.placement == "disk" and load_mixed(tmp_path / "m.safetensors").plan == MIXED_PLAN
    anonymous = m.reparameterize(lut_format=MIXED_PLAN, counts=counts, check_quality=False, progress=False,
                                 placement="disk")
    ids = torch.tensor([[1, 7, 7, 88, 40]])
    with torch.no_grad():
        ref = host(ids).logits
        for other in (disk, anonymous):
            assert torch.equal(other(ids).logits, ref)
    host.save_pretrained(tmp_path / "saved")  # the official layout: the mixed table dequantized
    with torch.no_grad():
        torch.testing.assert_close(MoLEForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits, ref,
                                   rtol=1e-5, atol=1e-5)
    for kw, message in [(dict(placement="device"), "no device tier"),
                        (dict(counts=torch.ones(88)), r"counts must be per-id token counts \[V\] = \[89\]"),
                        (dict(counts=-torch.ones(89)), "counts must be finite and >= 0"),
                        (dict(block_size=8), "block_size=8 does not apply to the mixed plan")]:
        with pytest.raises(ValueError, match=message):
            m.reparameterize(**{"lut_format": MIXED_PLAN, "counts": counts, "check_quality": False, "progress": False,
                                **kw})
    with pytest.raises(ValueError, match="counts= ranks the ids of a mixed plan"):
        m.reparameterize(lut_format="int8", counts=counts, progress=False)
    disk.lut.close()
    anonymous.lut.close()


def test_a_mixed_table_file_opens_only_where_it_is_served(tmp_path, capsys):
    """from_pretrained(lut_file=) refuses what it cannot serve from a mixed file, naming it; a truncated or
    corrupt file is refused at open; LookupTable.open (and so tensor parallelism and vLLM) says what the file is."""
    from mole_kernels.table import LookupTable

    m, folder, text, _ = _model_with_text(tmp_path)
    assert _reparameterize_mixed(tmp_path, folder, text, "rep", "--lut-format", MIXED_PLAN, "--no-quality-check",
                                 "--counts-text", str(text)) == 0
    rep, lut = tmp_path / "rep", tmp_path / "rep.safetensors"
    load = MoLEForCausalLM.from_pretrained
    assert load(rep, lut_file=lut, lut_format=MIXED_PLAN).lut.lut.plan == MIXED_PLAN  # the file's own plan: fine
    for kw, message in [(dict(placement="device"), "no device tier"),
                        (dict(lut_format="int8", block_size=32), "block_size=32 does not apply"),
                        (dict(lut_format="norm:int8@9+f4x5"), f"holds the mixed table {MIXED_PLAN!r}"),
                        (dict(lut_format="nf4"), f"holds the mixed table {MIXED_PLAN!r}")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            load(rep, lut_file=lut, **kw)
    with pytest.raises(ValueError, match="is a mixed plan, which ranks ids"):
        load(rep, lut_format=MIXED_PLAN)
    with pytest.raises(ValueError, match="a mixed-precision table .*MixedLookupTable.open"):
        LookupTable.open(lut)  # what tensor parallelism and vLLM open a lut_file with
    from mole_kernels.model.tensor_parallel import check_tensor_parallel

    with pytest.raises(ValueError, match="is a mixed plan; mixed tables are served by MoLEForCausalLM on a CPU"):
        check_tensor_parallel(m.config, 2, lut_format=MIXED_PLAN)
    data = lut.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-7])
    for placement in ("host", "disk"):
        with pytest.raises(ValueError, match="truncated"):
            load(rep, lut_file=tmp_path / "short.safetensors", placement=placement)
    from mole_kernels.mixed import load_mixed

    good = load_mixed(lut)
    bad = good.rank.clone()
    bad[1] = bad[0]  # a rank map that is no permutation: rows of two ids would collide
    raw = bytearray(data)
    at = data.index(good.rank.numpy().tobytes())
    raw[at:at + 4 * 89] = bad.numpy().tobytes()
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    for placement in ("host", "disk"):
        with pytest.raises(ValueError, match="not a valid mixed table file: .*rank must be a permutation"):
            load(rep, lut_file=tmp_path / "bad.safetensors", placement=placement)


def test_vs_dense_marks_differences_within_the_spread():
    from mole_kernels._demo import _Entry, extra_cost, within_spread

    dense, same, slower = _Entry("dense baseline", None), _Entry("a", None), _Entry("b", None)
    dense.times, same.times, slower.times = [1.0, 1.2, 1.4], [0.9, 1.1, 1.3], [2.0, 2.1, 2.2]
    assert within_spread(same, dense) and not within_spread(slower, dense)
    # a median below the dense model's within the spread is noise, not a negative cost
    assert "less than the run-to-run spread" in extra_cost(same, dense, new_tokens=10, layers=2)
    assert "about 45000 us per layer" in extra_cost(slower, dense, new_tokens=10, layers=2)


def test_a_mistyped_command_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        _parser(PROG).parse_args(["dmeo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error: ") and "did you mean 'demo'?" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        _parser(PROG).parse_args(["reparameterize", "--from", "a", "--to", "b", "--dtype", "bf61"])
    assert "did you mean 'bf16'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser(PROG).parse_args(["zzzzzz"])
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess


def test_quality_records_the_command_as_run(tmp_path):
    md = tmp_path / "q.md"
    assert main([*SMALL_QUALITY, "--variants", "int8", "--quiet", "--markdown", str(md)],
                prog="python -m mole_kernels") == 0
    assert "- command: `python -m mole_kernels quality " in md.read_text()


def test_quality_shows_progress(capsys, monkeypatch):
    pytest.importorskip("tqdm", reason="the progress bars are tqdm's (a dependency of the package)")
    assert main([*SMALL_QUALITY, "--variants", "int8,nf4-64"]) == 0
    assert "quality: LUT variants" not in capsys.readouterr().err  # stderr is no terminal here: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*SMALL_QUALITY, "--variants", "int8,nf4-64"]) == 0
    assert "quality: LUT variants" in capsys.readouterr().err
    assert main([*SMALL_QUALITY, "--variants", "int8", "--quiet"]) == 0
    assert "quality: LUT variants" not in capsys.readouterr().err


def test_quality_checks_arguments_before_building_a_model(tmp_path, capsys, monkeypatch):
    import mole_kernels.model

    monkeypatch.setattr(mole_kernels.model, "MoLEForCausalLM", lambda *a, **k: pytest.fail("built a model first"))
    for extra, message in [(["--variants", "nf4-100"], "--variants 'nf4-100'"),
                           (["--variants", "fp16-64"], "a float LUT has no block size"),
                           (["--variants", "int9"], "unknown format"),
                           (["--markdown", str(tmp_path)], "is a folder"),
                           (["--hidden", "30"], "hidden_size")]:  # heads (4) do not divide it
        assert main([*SMALL_QUALITY, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(f"{PROG} quality: error: ") and message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- info --------------------


def test_info_in_process(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["torch_runtime"] == torch.__version__
    assert facts["cuda_runtime_available"] == torch.cuda.is_available()
    assert "host" in facts["lut_tiers"] and ("device" in facts["lut_tiers"]) == torch.cuda.is_available()


def test_info_into_a_closed_pipe():
    """`mole-kernels info | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "mole_kernels", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    proc.stdout.close()  # before the command writes anything (it imports torch first)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert err == "" and proc.returncode == 0


# ---------------------------------------------------------------- arguments and errors ----


@pytest.mark.parametrize("args,message", [
    (["demo", "--new-tokens", "0"], "argument --new-tokens: must be at least 2, got 0"),
    (["demo", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["demo", "--hidden", "-8"], "argument --hidden: must be at least 1, got -8"),
    (["demo", "--vocab", "ten"], "argument --vocab: expected an integer, got 'ten'"),
    (["demo", "--save-model", "/proc/mole-demo"], "--save-model '/proc/mole-demo': cannot write into '/proc'"),
    (["quality", "--init-std", "nan"], "argument --init-std: must be a finite number > 0"),
    (["quality", "--markdown", "/no/such/folder/q.md"], "its folder '/no/such/folder' does not exist"),
    (["reparameterize", "--from", "x", "--to", "y", "--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
    (["reparameterize", "--from", "x", "--to", "y", "--block-size", "64"], "--block-size needs --lut-format"),
    (["reparameterize", "--to", "y"], "the following arguments are required: --from"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_user_errors_are_one_line_and_exit_2(args, message):
    res = _run(args)
    assert res.returncode == 2, res
    lines = res.stderr.splitlines()
    prefix = "python -m mole_kernels" + ("" if args[0] == "nonsense" else f" {args[0]}")
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: error: ") and message in lines[0], res.stderr
    assert res.stdout == ""


def test_dtype_names_are_one_list(capsys):
    """Every message about a LUT dtype lists the same names, and each of them is accepted."""
    with pytest.raises(SystemExit):
        main(["reparameterize", "--from", "x", "--to", "y", "--dtype", "fp64"])
    listed = re.search(r"choose from ([^)]*)\)", capsys.readouterr().err).group(1)
    assert re.findall(r"\w+", listed) == ["fp32", "fp16", "bf16"]
    with pytest.raises(SystemExit):
        main(["reparameterize", "--help"])
    assert "{fp32,fp16,bf16}" in capsys.readouterr().out


def _all_options():
    parser = _parser(PROG)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in [(PROG, parser), *sub.choices.items()]:
        for action in command._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                yield name, command, action


def test_every_option_has_help_and_shows_its_default():
    for name, command, action in _all_options():
        assert action.help, f"{name} {action.option_strings}: no help text"
        help_text = " ".join(command.format_help().split())
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            assert f"(default: {action.default})" in help_text, (name, action.option_strings)


def _console_script(tmp_path, body):
    """A stand-in for the installed `mole-kernels` script (the same name, so the same import path)."""
    script = tmp_path / "mole-kernels"
    script.write_text("import atexit, sys\n"
                      "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr))\n"
                      + body)
    return script


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["demo", "--help"], ["demo", "--batch", "0"],
                                  ["quality", "--markdown", "/proc/x.md"]])
def test_console_script_answers_without_torch(tmp_path, args):
    script = _console_script(tmp_path, "from mole_kernels.cli import main\nsys.exit(main())\n")
    res = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert res.returncode in (0, 2), res.stderr
    assert "torch imported: False" in res.stderr
    if args == ["--version"]:
        assert res.stdout.strip() == f"{PROG} {mole_kernels.__version__}"


def test_python_dash_m_help_without_torch():
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "mole_kernels", "--help"], capture_output=True,
                         text=True, timeout=60, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0 and "usage: python -m mole_kernels" in res.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")]
    assert "mole_kernels.cli" in imported and not [m for m in imported if m.split(".")[0] == "torch"]


def test_the_command_loads_the_api_on_first_use(tmp_path):
    """Imported as the command, the package defers the API; using it still works."""
    script = _console_script(tmp_path, "import mole_kernels\nprint('torch' in sys.modules)\n"
                                       "print(mole_kernels.lut_gather.__module__, 'torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.stdout.split() == ["False", "mole_kernels.lut_gather", "True"], res.stderr


def test_import_registers_the_ops_and_exports_the_api():
    assert "torch" in sys.modules and hasattr(torch.ops.mole_kernels, "lut_gather")
    public = {n for n in vars(_api) if not n.startswith("_")}
    assert public == set(mole_kernels.__all__)
    assert all(getattr(mole_kernels, n) is getattr(_api, n) for n in public)


# ---------------------------------------------------------------- a broken install --------


def _copy_package(dest):
    """The package's Python files (no compiled extension) under dest/mole_kernels."""
    os.makedirs(dest / "mole_kernels")
    for name in os.listdir(PACKAGE):
        if name.endswith(".py"):
            with open(os.path.join(PACKAGE, name), "rb") as f:
                (dest / "mole_kernels" / name).write_bytes(f.read())
    return dest / "mole_kernels"


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def test_unbuilt_source_tree_gives_one_message(tmp_path):
    """`python -m mole_kernels` (or `python -m pytest`) at the root of a clone that was never built."""
    _copy_package(tmp_path)
    (tmp_path / "setup.py").write_text("")
    res = subprocess.run([sys.executable, "-m", "mole_kernels", "info"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=_clean_env())
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m mole_kernels info: error: mole_kernels._C is not built")
    assert "build_ext --inplace" in lines[0] and "circular" not in lines[0]
    res = subprocess.run([sys.executable, "-m", "mole_kernels", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=_clean_env())
    assert res.returncode == 0  # help needs no extension


def test_extension_built_for_another_torch_names_both(tmp_path):
    pkg = _copy_package(tmp_path)
    (pkg / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"not a shared library")
    (pkg / "_build_info.json").write_text(json.dumps({"torch": "1.0.0+fake", "source": str(tmp_path / "gone")}))
    res = subprocess.run([sys.executable, "-c", "import mole_kernels"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=_clean_env())
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: mole_kernels._C was built against torch 1.0.0+fake, but torch "
                           f"{torch.__version__} is running")
    assert f"{sys.executable} -m pip install --force-reinstall --no-deps <mole_kernels source folder>" in last
    assert "circular" not in res.stderr


def test_rebuild_command_names_the_recorded_source(tmp_path, monkeypatch):
    (tmp_path / "setup.py").write_text("")
    monkeypatch.setattr(_build_check, "PACKAGE_DIR", str(tmp_path / "site" / "mole_kernels"))
    assert _build_check.rebuild_command(str(tmp_path)).endswith(f"--no-deps {tmp_path}")
    warning = _build_check.mismatch_warning("1.0.0", "2.0.0")
    assert "built against torch 1.0.0 but torch 2.0.0 is running" in warning
