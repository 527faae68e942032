"""The `mole-kernels` command: demo, reparameterize, info (in-process, plus one subprocess)."""
import json
import os
import re
import subprocess
import sys

import torch

from mole_kernels.cli import main
from mole_kernels.model import MoLEConfig, MoLEForCausalLM

SMALL_DEMO = ["demo", "--vocab", "97", "--hidden", "32", "--layers", "2", "--experts", "3", "--heads", "2",
              "--prompt-len", "5", "--new-tokens", "4", "--batch", "2"]


def _tiny():
    cfg = MoLEConfig(vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_experts=2)
    return MoLEForCausalLM(cfg, init_std=0.2).eval()


def test_demo_prints_every_tier_and_baseline(capsys):
    threads = torch.get_num_threads()
    try:
        assert main(SMALL_DEMO) == 0
    finally:
        torch.set_num_threads(threads)  # the demo picks one thread on the CPU
    out = capsys.readouterr().out
    tiers = (["device"] if torch.cuda.is_available() else []) + ["host", "disk"]
    for tier in tiers:
        line = next(l for l in out.splitlines() if l.startswith(f"MoLE, LUT on {tier} "))
        delta = float(line.split()[-1])
        assert delta <= 1e-4  # fp32 LUT: the same logits as the train form
        assert "*" not in line  # and the same greedy tokens
    assert "dense baseline" in out and "experts offloaded" in out
    bf16 = next(l for l in out.splitlines() if "(bfloat16)" in l)
    assert 1e-6 < float(bf16.split()[-1]) < 1.0
    # quantized host tables: logits move more than bf16's, bytes per token shrink (D = 32: one scale per row)
    int8 = next(l for l in out.splitlines() if l.startswith("MoLE, LUT on host (int8, block 32)"))
    nf4 = next(l for l in out.splitlines() if l.startswith("MoLE, LUT on host (nf4, block 32)"))
    fp32 = next(l for l in out.splitlines() if l.startswith("MoLE, LUT on host "))
    deltas = [float(l.replace(" *", "").split()[-1]) for l in (bf16, int8, nf4)]
    assert 0 < deltas[0] < deltas[2] < 5.0 and 0 < deltas[1] < deltas[2]

    def per_token(line):  # the "LUT/expert bytes per token" column, e.g. "1.5 KiB"
        value, unit = re.findall(r"([0-9.]+) (B|KiB|MiB)", line)[0]
        return float(value) * {"B": 1, "KiB": 1024, "MiB": 1 << 20}[unit]

    assert per_token(nf4) < per_token(int8) < per_token(fp32) / 2  # 32 and 48 vs 128 bytes a row


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
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    assert main(["reparameterize", "--from", str(tmp_path / "bad"), "--to", str(tmp_path / "out")]) == 2
    assert "JSON object" in capsys.readouterr().err
    m = _tiny()
    m.save_pretrained(tmp_path / "train")
    assert main(["reparameterize", "--from", str(tmp_path / "train"), "--to", str(tmp_path / "o"), "--dtype",
                 "int8"]) == 2
    assert "--dtype" in capsys.readouterr().err
    m.reparameterize(progress=False).save_pretrained(tmp_path / "rep")
    assert main(["reparameterize", "--from", str(tmp_path / "rep"), "--to", str(tmp_path / "o")]) == 2
    assert "already re-parameterized" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_info_in_process(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["torch_runtime"] == torch.__version__
    assert facts["cuda_runtime_available"] == torch.cuda.is_available()
    assert "host" in facts["lut_tiers"] and ("device" in facts["lut_tiers"]) == torch.cuda.is_available()


def test_python_dash_m_info():
    # cwd: the tests folder, so `-m` finds the installed package, not the source tree's
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-m", "mole_kernels", "info"], capture_output=True, text=True, cwd=here,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^torch\s+\S+", res.stdout, re.M) and "lut_tiers" in res.stdout
