"""Issue 21: MoLE as a Hugging Face transformers model (mole_kernels.integrations.hf).

Auto-class round trip, every generate mode (greedy on every tier and LUT format equal to
MoLEForCausalLM.generate, sampling identical across tiers, beams, streamer, left-padded batches),
pipeline, the misread guard, the train-form placement behaviour, the CLI `generate` (pipe and
tty) and its missing-tokenizer error, and the loading memory bound through transformers.
"""
import json
import os
import pty
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA, cuda_param

transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers "
                                                          "(pip install 'transformers>=5.16.1,<5.20' tokenizers)")
pytest.importorskip("tokenizers", reason="the tokenizer tests need tokenizers (pip install tokenizers)")

from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig,  # noqa: E402
                          TextStreamer, pipeline)
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from mole_kernels import MoLEConfig, MoLEForCausalLM  # noqa: E402
from mole_kernels._tokenizer import save_tokenizer  # noqa: E402
from mole_kernels.integrations.hf import MoleConfig, MoleForCausalLM, MoleKVCache  # noqa: E402
from mole_kernels.model import DenseForCausalLM  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TIERS = [cuda_param("device"), "host", "disk"]
# A LUT's formats: float dtypes, and quantized tables (served from a LookupTable file).
FORMATS = ["float32", "float16", "bfloat16", "int8", "fp8", "nf4"]
CFG = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, num_experts=3)


def _device(tier):
    return "cuda" if tier == "device" else "cpu"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A seeded train-form folder with a tokenizer, and its re-parameterized form (fp32 LUT), both ours."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    train = MoLEForCausalLM(MoLEConfig(**CFG), init_std=0.1).eval()
    train.save_pretrained(root / "train")
    assert "wrote" in save_tokenizer(str(root / "train"), CFG["vocab_size"])
    train.reparameterize(placement="host", dtype=torch.float32, progress=False).save_pretrained(root / "rep")
    return root


@pytest.fixture(scope="module")
def tokenizer(folders):
    tok = AutoTokenizer.from_pretrained(folders / "train")
    tok.padding_side = "left"
    return tok


def _load(folders, tier, fmt="float32"):
    kw = dict(lut_placement=tier, device=_device(tier))
    if fmt in ("float16", "bfloat16"):
        kw["lut_dtype"] = fmt
    elif fmt != "float32":
        kw["lut_format"] = fmt
    return AutoModelForCausalLM.from_pretrained(folders / "rep", **kw)


# ---------------------------------------------------------------- loading -----------------


def test_auto_classes_load_our_folders_as_mole(folders, tmp_path):
    config = AutoConfig.from_pretrained(folders / "rep")
    assert isinstance(config, MoleConfig) and config.num_experts == CFG["num_experts"]
    model = AutoModelForCausalLM.from_pretrained(folders / "rep", lut_placement="disk")
    assert isinstance(model, MoleForCausalLM) and model.lut.placement == "disk"
    assert "model.moe_table.weight" not in model.state_dict()  # the LUT is never a parameter or buffer
    assert not any("moe_table" in n for n, _ in model.named_buffers())
    core = MoLEForCausalLM.from_pretrained(folders / "rep")
    ids = torch.randint(0, CFG["vocab_size"], (2, 7))
    torch.testing.assert_close(model(ids).logits, core(ids).logits, rtol=0, atol=0)
    # save_pretrained -> Auto again: the same model, generation config kept
    model.generation_config.max_new_tokens = 5
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["model_type"] == "mole" and saved["architectures"] == ["MoleForCausalLM"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", lut_placement="host")
    assert again.generation_config.max_new_tokens == 5
    torch.testing.assert_close(again(ids).logits, core(ids).logits, rtol=0, atol=0)
    # pipeline-style loading knobs: dtype, device_map naming one device; unknown ones are refused
    half = AutoModelForCausalLM.from_pretrained(folders / "rep", dtype=torch.bfloat16, device_map="cpu")
    assert half.dtype == torch.bfloat16 and half.lut.dtype == torch.float32
    with pytest.raises(ValueError, match="quantization_config"):
        AutoModelForCausalLM.from_pretrained(folders / "rep", quantization_config={"x": 1})
    with pytest.raises(ValueError, match="one device"):
        AutoModelForCausalLM.from_pretrained(folders / "rep", device_map="auto")
    with pytest.raises(ValueError, match="placement"):
        AutoModelForCausalLM.from_pretrained(folders / "rep", lut_placement="gpu")


def test_official_folder_loads_through_our_class(folders, tmp_path):
    """An official folder ("model_type": "llama") is Llama to AutoModel; MoleForCausalLM.from_pretrained
    reads it as MoLE, and saving it writes a folder of ours ("mole", no remote-code pointers)."""
    official = tmp_path / "official"
    official.mkdir()
    (official / "model.safetensors").symlink_to(folders / "rep" / "model.safetensors")
    cfg = json.loads((folders / "rep" / "config.json").read_text())
    cfg.update(model_type="llama", auto_map={"AutoModelForCausalLM": "modeling_mole.MoleForCausalLM"})
    (official / "config.json").write_text(json.dumps(cfg))
    model = MoleForCausalLM.from_pretrained(official, lut_placement="disk")
    ids = torch.randint(0, CFG["vocab_size"], (1, 9))
    want = MoLEForCausalLM.from_pretrained(folders / "rep")(ids).logits
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "mole" and "auto_map" not in saved


_UNREGISTERED = """
import sys, transformers
from transformers import AutoModelForCausalLM
try:
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
except (ValueError, KeyError) as e:
    print("refused:", type(e).__name__, str(e)[:200])
else:
    print("loaded as", type(m).__name__)
"""


@pytest.mark.parametrize("which", ["train", "rep"])
def test_our_folders_never_load_as_llama_without_the_integration(folders, which):
    """The misread guard: transformers that does not know "mole" refuses our folders (a fresh process,
    where mole_kernels.integrations.hf was never imported), it never returns a LlamaForCausalLM."""
    assert json.loads((folders / which / "config.json").read_text())["model_type"] == "mole"
    res = subprocess.run([sys.executable, "-c", _UNREGISTERED, str(folders / which)], capture_output=True,
                         text=True, timeout=300, cwd=HERE)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("refused:"), res.stdout
    assert "mole" in res.stdout


# ---------------------------------------------------------------- train form + placement --


def test_from_pretrained_of_a_train_folder_honours_placement(folders):
    train = MoLEForCausalLM.from_pretrained(folders / "train")  # not given: the train form, as stored
    assert not train.is_reparameterized and train.lut is None
    ids = torch.randint(0, CFG["vocab_size"], (2, 6))
    for tier in ("host", "disk"):
        inf = MoLEForCausalLM.from_pretrained(folders / "train", placement=tier)
        assert inf.is_reparameterized and inf.lut.placement == tier
        torch.testing.assert_close(inf(ids).logits, train(ids).logits, rtol=1e-4, atol=1e-4)
    q = MoLEForCausalLM.from_pretrained(folders / "train", placement="host", lut_format="int8")
    assert q.lut.format == "int8"
    with pytest.raises(ValueError, match="placement must be"):
        MoLEForCausalLM.from_pretrained(folders / "train", placement="gpu")
    with pytest.raises(ValueError, match="pass placement="):
        MoLEForCausalLM.from_pretrained(folders / "train", lut_format="int8")
    # through transformers: the same behaviour
    hf = AutoModelForCausalLM.from_pretrained(folders / "train", lut_placement="disk")
    assert hf.lut.placement == "disk"
    assert AutoModelForCausalLM.from_pretrained(folders / "train").lut is None


def test_train_folder_reparameterize_shows_progress(folders, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars are drawn on a terminal only
    MoLEForCausalLM.from_pretrained(folders / "train", placement="host")
    assert "reparameterizing" in capsys.readouterr().err


# ---------------------------------------------------------------- generate -----------------


def _prompts(tokenizer, texts, device="cpu"):
    return tokenizer(texts, return_tensors="pt", padding=True).to(device)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tier", TIERS)
def test_greedy_equals_the_core_generate(folders, tokenizer, tier, fmt):
    """Greedy tokens through transformers' generate equal MoLEForCausalLM.generate's (same loaded model),
    one prompt and a left-padded batch of two."""
    model = _load(folders, tier, fmt)
    for texts in (["The quick brown fox"], ["Return the value", "A list of the keys in order, sorted"]):
        enc = _prompts(tokenizer, texts, _device(tier))
        got = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        want = model.core.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=12)
        assert torch.equal(got, want), (tier, fmt, texts)


def test_the_lut_term_matters(folders, tokenizer):
    """Parity is not vacuous: zeroing the LUT changes the greedy tokens."""
    model = _load(folders, "host")
    enc = _prompts(tokenizer, ["The quick brown fox"])
    tokens = model.generate(**enc, max_new_tokens=12, do_sample=False)
    zero = model.lut.read().zero_()
    from mole_kernels import LookupTable

    model.core.set_lut(LookupTable.from_tensor(zero, "host"))
    assert not torch.equal(model.generate(**enc, max_new_tokens=12, do_sample=False), tokens)


def test_sampling_with_a_seed_is_the_same_on_every_tier(folders, tokenizer):
    enc = _prompts(tokenizer, ["Return the value", "A list of the keys"])
    options = dict(do_sample=True, temperature=1.3, top_k=50, top_p=0.95, max_new_tokens=16)
    runs = {}
    for tier in ["host", "disk"] + (["device"] if HAS_CUDA else []):
        model = _load(folders, tier)
        torch.manual_seed(7)
        runs[tier] = model.generate(**enc.to(_device(tier)), **options).cpu()
    for tier, tokens in runs.items():
        assert torch.equal(tokens, runs["host"]), tier
    torch.manual_seed(8)
    assert not torch.equal(_load(folders, "host").generate(**enc, **options), runs["host"])  # the seed matters
    greedy = _load(folders, "host").generate(**enc, max_new_tokens=16, do_sample=False)
    assert not torch.equal(greedy, runs["host"])


def test_left_padded_batch_equals_each_prompt_alone(folders, tokenizer):
    model = _load(folders, "disk")
    texts = ["Return", "A list of the keys in the mapping", "Open the file"]
    batch = model.generate(**_prompts(tokenizer, texts), max_new_tokens=10, do_sample=False)
    assert (_prompts(tokenizer, texts)["attention_mask"] == 0).any()  # the batch really is padded
    for i, text in enumerate(texts):
        alone = model.generate(**_prompts(tokenizer, [text]), max_new_tokens=10, do_sample=False)
        assert torch.equal(batch[i, -10:], alone[0, -10:]), text


def test_streamer_sees_the_returned_tokens(folders, tokenizer, capsys):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).clone())

        def end(self):
            self.ended = True

    model = _load(folders, "disk")
    enc = _prompts(tokenizer, ["The quick brown fox"])
    collect = Collect()
    out = model.generate(**enc, max_new_tokens=9, do_sample=False, streamer=collect)
    assert collect.ended and torch.equal(torch.cat(collect.chunks), out[0])
    capsys.readouterr()
    out = model.generate(**enc, max_new_tokens=9, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(out[0, enc["input_ids"].shape[1]:]) + "\n"


def test_beam_search_reorders_the_cache():
    """Beams with the cache equal beams recomputing every step without it (float64: no near ties)."""
    torch.manual_seed(1)
    core = MoLEForCausalLM(MoLEConfig(**CFG), init_std=0.1).double().eval()
    model = MoleForCausalLM.from_model(core)
    ids = torch.randint(0, CFG["vocab_size"], (2, 5))
    options = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False, early_stopping=False)
    cached = model.generate(ids, **options)
    uncached = model.generate(ids, use_cache=False, **options)
    assert cached.shape == (4, 13) and torch.equal(cached, uncached)


def test_forward_continues_its_cache_and_grows_it(folders):
    model = _load(folders, "host")
    ids = torch.randint(0, CFG["vocab_size"], (2, 70))
    full = model(ids).logits
    out = model(ids[:, :30], use_cache=True)
    assert isinstance(out.past_key_values, MoleKVCache) and out.cache is out.past_key_values
    pieces = [out.logits]
    for a, b in ((30, 31), (31, 70)):  # one token, then past the first allocation (grown)
        out = model(ids[:, a:b], past_key_values=out.past_key_values, use_cache=True)
        pieces.append(out.logits)
    assert out.past_key_values.get_seq_length() == 70 and out.past_key_values.max_len >= 70
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)
    # a later transformers' name for the cache: `cache=` in, `cache` out
    out2 = model(ids[:, :30], use_cache=True)
    nxt = model(ids[:, 30:31], cache=out2.cache, use_cache=True)
    torch.testing.assert_close(nxt.logits, full[:, 30:31], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.zeros(1, 2, CFG["hidden_size"]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids[:, :3], attention_mask=torch.ones(2, 4))


def test_cache_crop_and_assisted_generation(folders, tokenizer):
    """crop() forgets tokens (what assisted decoding does with rejected drafts): feeding them again gives
    the logits of a fresh pass; assisted greedy decoding (the model drafting for itself) equals greedy."""
    model = _load(folders, "host")
    ids = torch.randint(0, CFG["vocab_size"], (1, 10))
    full = model(ids).logits
    out = model(ids, use_cache=True)
    out.past_key_values.crop(6)
    assert out.past_key_values.get_seq_length() == 6
    again = model(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(again, full[:, 6:], rtol=1e-4, atol=1e-4)
    enc = _prompts(tokenizer, ["The quick brown fox"])
    greedy = model.generate(**enc, max_new_tokens=10, do_sample=False)
    assisted = model.generate(**enc, max_new_tokens=10, do_sample=False, assistant_model=_load(folders, "disk"))
    assert torch.equal(assisted, greedy)


def test_pipeline_text_generation(folders, tokenizer):
    model = _load(folders, "disk")
    gen = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "The quick brown fox"
    text = gen(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    enc = _prompts(tokenizer, [prompt])
    want = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert text == tokenizer.decode(want[0], skip_special_tokens=True)
    # and from the folder's name alone (model and tokenizer through the Auto classes)
    text2 = pipeline("text-generation", model=str(folders / "train"))(prompt, max_new_tokens=4, do_sample=False)
    assert text2[0]["generated_text"].startswith(prompt)


def test_dense_baseline_through_the_same_class():
    torch.manual_seed(0)
    core = MoLEForCausalLM(MoLEConfig(**CFG)).eval()
    dense = DenseForCausalLM.from_mole(core)
    model = MoleForCausalLM.from_model(dense)
    ids = torch.randint(0, CFG["vocab_size"], (1, 4))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), dense.generate(ids, max_new_tokens=6))
    with pytest.raises(ValueError, match="baseline"):
        model.save_pretrained("unused")
    assert GenerationConfig.from_model_config(model.config).max_length == model.generation_config.max_length


# ---------------------------------------------------------------- the command --------------


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "mole_kernels", *args], capture_output=True, text=True,
                          timeout=300, cwd=HERE, **kw)


def _expected_text(folders, tokenizer, prompt, n, **options):
    model = AutoModelForCausalLM.from_pretrained(folders / "train", lut_placement="disk")
    enc = tokenizer(prompt, return_tensors="pt")
    if options.get("do_sample"):
        torch.manual_seed(options.pop("seed"))
    out = model.generate(**enc, max_new_tokens=n, pad_token_id=tokenizer.pad_token_id, **options)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_cli_generate_with_a_mixed_table(folders, tokenizer, tmp_path):
    """`generate --lut-file MIXED.safetensors`: the mixed table (a save_mixed file) served on the disk tier through
    transformers, the same text as the model loaded in Python, and the table named by its plan and bits/value."""
    plan = "norm:int8@16+f8x5"
    train = MoLEForCausalLM.from_pretrained(folders / "train")
    counts = torch.randint(0, 100, (CFG["vocab_size"],), generator=torch.Generator().manual_seed(1))
    rep = train.reparameterize(lut_format=plan, counts=counts, check_quality=False, progress=False,
                               placement="disk", path=tmp_path / "mixed.safetensors")
    prompt = "Return the value"
    res = _cli(["generate", "--model", str(folders / "rep"), "--tokenizer", str(folders / "train"),
                "--lut-file", str(tmp_path / "mixed.safetensors"),
                "--placement", "disk", "--prompt", prompt, "--max-new-tokens", "8"])
    assert res.returncode == 0, res.stderr
    lut = rep.lut.lut
    assert f"LUT mixed {plan} ({lut.describe()}), {lut.bits_per_value:.3f} bits/value" in res.stderr, res.stderr
    model = AutoModelForCausalLM.from_pretrained(folders / "rep", lut_file=tmp_path / "mixed.safetensors",
                                                 lut_placement="disk")
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert res.stdout == tokenizer.decode(out[0], skip_special_tokens=True) + "\n"
    assert torch.equal(out, rep.generate(enc["input_ids"], max_new_tokens=8))  # parity with the core
    rep.lut.close()


def test_cli_generate_to_a_pipe(folders, tokenizer):
    prompt = "Return the value"
    res = _cli(["generate", "--model", str(folders / "train"), "--prompt", prompt, "--placement", "disk",
                "--max-new-tokens", "10"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == _expected_text(folders, tokenizer, prompt, 10, do_sample=False) + "\n"
    assert "LUT tier disk, greedy" in res.stderr and "tokens/s" in res.stderr
    sampled = _cli(["generate", "--model", str(folders / "train"), "--prompt", prompt, "--placement", "disk",
                    "--max-new-tokens", "10", "--temperature", "1.2", "--top-k", "40", "--top-p", "0.9",
                    "--seed", "3"])
    assert sampled.returncode == 0, sampled.stderr
    want = _expected_text(folders, tokenizer, prompt, 10, do_sample=True, temperature=1.2, top_k=40, top_p=0.9,
                          seed=3)
    assert sampled.stdout == want + "\n"


def test_cli_generate_to_a_terminal(folders, tokenizer):
    """On a tty the text streams as it is made; what reaches the terminal is the same text."""
    prompt = "Open the file"
    main, sub = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mole_kernels", "generate", "--model", str(folders / "train"),
                             "--prompt", prompt, "--placement", "host", "--max-new-tokens", "8"],
                            stdout=sub, stderr=subprocess.PIPE, cwd=HERE)
    os.close(sub)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    os.close(main)
    shown = b"".join(chunks).decode().replace("\r\n", "\n")
    assert shown == _expected_text(folders, tokenizer, prompt, 8, do_sample=False) + "\n"


def test_cli_generate_without_a_tokenizer_says_what_is_missing(folders):
    res = _cli(["generate", "--model", str(folders / "rep"), "--prompt", "hi"])
    assert res.returncode == 2
    assert "has no tokenizer" in res.stderr and "tokenizer.json" in res.stderr and "--tokenizer" in res.stderr
    assert "Traceback" not in res.stderr
    ok = _cli(["generate", "--model", str(folders / "rep"), "--tokenizer", str(folders / "train"), "--prompt", "hi",
               "--max-new-tokens", "3"])
    assert ok.returncode == 0, ok.stderr


def test_demo_saves_a_tokenizer_and_reparameterize_keeps_it(tmp_path):
    train, rep = tmp_path / "train", tmp_path / "rep"
    res = _cli(["demo", "--vocab", "300", "--hidden", "32", "--layers", "2", "--heads", "2", "--repeats", "1",
                "--new-tokens", "2", "--cpu", "--save-model", str(train)])
    assert res.returncode == 0, res.stderr
    assert "wrote a byte-level BPE tokenizer of 300 entries" in res.stdout
    tok = AutoTokenizer.from_pretrained(train)
    assert len(tok) == 300 and tok.decode(tok("print(value)")["input_ids"]) == "print(value)"
    assert _cli(["reparameterize", "--from", str(train), "--to", str(rep), "--quiet"]).returncode == 0
    assert AutoTokenizer.from_pretrained(rep)("x")["input_ids"] == tok("x")["input_ids"]


# ---------------------------------------------------------------- memory ------------------


@pytest.fixture(scope="module")
def hf_peaks(tmp_path_factory):
    """Extra peak RSS of AutoModelForCausalLM.from_pretrained on each tier (a fresh child each, the
    checkpoints built once; bench/memory_peaks.py), with the module that measured it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_peaks", os.path.join(HERE, "..", "bench", "memory_peaks.py"))
    peaks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peaks)
    if not peaks.status_available():
        pytest.skip("needs /proc/self/status with VmHWM (Linux) to read a process's peak RSS")
    rows = peaks.measure_many([(peaks.HF_CASE, 64, p) for p in ("disk", "host")], str(tmp_path_factory.mktemp("peaks")))
    return peaks, {r["placement"]: r for r in rows}


@pytest.mark.parametrize("placement", ["disk", "host"])
def test_loading_through_transformers_keeps_the_memory_bound(hf_peaks, placement):
    """Disk <= 0.25x the LUT, host <= 1.15x, as MoLEForCausalLM.from_pretrained."""
    peaks, rows = hf_peaks
    r = rows[placement]
    assert r["lut_bytes"] == 64 << 20, r  # the table the ratio divides by is the folder's LUT
    assert r["hwm_reset"] or not r["upper_bound"], r
    assert r["ratio"] <= peaks.GOALS[placement], r
