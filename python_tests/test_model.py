"""The reference MoLE model: architecture, training, re-parameterization, inference on every
LUT tier, generation, official checkpoint folders, baselines. Tiny sizes: runs in seconds on CPU."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, cuda_param, requires_cuda
from mole_kernels.model import (DenseForCausalLM, MoEForCausalLM, MoLEConfig, MoLEForCausalLM, LUT_KEY)

TIERS = ["host", "disk", cuda_param("device")]
DEV = "cuda" if HAS_CUDA else "cpu"
# Unit roundoff (half an ulp at 1) of the LUT dtypes: bf16 keeps 8 significant bits, fp16 11.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def tiny_config(**kw):
    base = dict(vocab_size=131, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_experts=3, rms_norm_eps=1e-5, rope_theta=500.0)
    base.update(kw)
    return MoLEConfig(**base)


def tiny_mole(**kw):
    # init_std 0.2 (not 0.02): the expert term must matter in the logits, or the equivalence
    # tests could not tell a right LUT from a wrong one.
    m = MoLEForCausalLM(tiny_config(**kw), init_std=0.2)
    with torch.no_grad():  # non-trivial norm weights, so a missing norm would show
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m.eval()


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------- an independent reference --


def official_reference(sd, cfg, ids, expert_rows=None):
    """The official modeling_mole.py forward in float64, written from the state dict alone.

    ``expert_rows(l, x)``: optional override of the layer's ``[B, S, E, D]`` expert outputs.
    """
    sd = {k: v.double() for k, v in sd.items()}
    B, S = ids.shape
    H, Hkv, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def mlp(x, p):
        return F.gelu(x @ sd[p + "up_proj.weight"].T) @ sd[p + "down_proj.weight"].T

    def rot(x):
        return torch.cat((-x[..., hd // 2:], x[..., :hd // 2]), -1)

    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.arange(S, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    causal = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)
    emb = sd["model.embed_tokens.weight"][ids]
    h = emb
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(B, S, H, hd).transpose(1, 2)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(B, S, Hkv, hd).transpose(1, 2)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(B, S, Hkv, hd).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        a = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + causal, -1) @ v
        h = h + a.transpose(1, 2).reshape(B, S, H * hd) @ sd[p + "self_attn.o_proj.weight"].T
        n = rms(h, sd[p + "post_attention_layernorm.weight"])
        probs = torch.softmax(n @ sd[p + "router.weight"].T, -1)
        if expert_rows is None:
            xe = rms(emb, sd[p + "expert_layernorm.weight"])
            rows = torch.stack([mlp(xe, f"{p}experts.{e}.") for e in range(cfg.num_experts)], 2)
        else:
            rows = expert_rows(l, ids)
        h = h + mlp(n, p + "mlp.") + (rows * probs[..., None]).sum(2)
    return rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


# ---------------------------------------------------------------- config ------------------


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="missing required key"):
        MoLEConfig.from_dict({"hidden_size": 8})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope_scaling"):
        MoLEConfig.from_dict({**tiny_config().to_dict(), "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="num_experts"):
        tiny_config(num_experts=0)
    d = {**tiny_config().to_dict(), "hidden_act": "gelu", "eos_token_id": [7, 8]}
    cfg = MoLEConfig.from_dict(d)
    assert cfg.eos_token_id == 7 and cfg.extra["hidden_act"] == "gelu"
    assert MoLEConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


# ---------------------------------------------------------------- train form --------------


@pytest.mark.parametrize("E,Hkv", [(3, 2), (1, 4)])
def test_train_form_is_the_official_architecture(E, Hkv):
    m = tiny_mole(num_experts=E, num_key_value_heads=Hkv)
    ids = torch.randint(0, m.config.vocab_size, (2, 9))
    ref = official_reference(m.state_dict(), m.config, ids)
    got = m.double()(ids).logits  # computed in float64, returned as float32 (as the official code)
    assert rel_err(got, ref) < 2.0 ** -23


def test_state_dict_names_are_official():
    keys = set(tiny_mole().state_dict())
    for k in ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
              "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.layers.0.experts.2.down_proj.weight", "model.layers.1.router.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.layers.0.expert_layernorm.weight", "model.norm.weight", "lm_head.weight"]:
        assert k in keys, k
    assert len(keys) == 2 + 1 + 2 * (4 + 2 + 1 + 3 * 2 + 3)


def test_training_step_reduces_loss():
    m = tiny_mole().train()
    ids = torch.randint(0, m.config.vocab_size, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100  # ignored positions
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    loss0 = m(ids, labels=labels).loss
    loss0.backward()
    for name in ["model.layers.1.experts.0.up_proj.weight", "model.layers.0.router.weight",
                 "model.layers.0.expert_layernorm.weight", "model.embed_tokens.weight"]:
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        loss1 = m(ids, labels=labels).loss
    assert loss1 < loss0
    # the loss is the mean next-token cross-entropy over non-ignored positions
    logits = m(ids).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(m(ids, labels=labels).loss, ref)


# ---------------------------------------------------------------- re-parameterization -----


@torch.no_grad()
def test_lut_holds_every_expert_on_every_token():
    m = tiny_mole().double()
    lut = m.compute_lut(chunk_size=7, progress=False)  # chunks that do not divide V
    cfg = m.config
    assert tuple(lut.shape) == cfg.lut_shape and lut.dtype == torch.float64
    for v in [0, 5, 64, cfg.vocab_size - 1]:
        for l, layer in enumerate(m.model.layers):
            x = layer.expert_layernorm(m.model.embed_tokens.weight[v])
            for e in range(cfg.num_experts):
                torch.testing.assert_close(lut[v, l, e], layer.experts[e](x), rtol=1e-12, atol=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("E", [1, 3])
def test_inference_form_matches_train_form_fp32(tier, E):
    m = tiny_mole(num_experts=E).to(DEV)
    inf = m.reparameterize(placement=tier, dtype=torch.float32, progress=False)
    assert inf.is_reparameterized and inf.lut.placement == tier
    assert not any(".experts." in k for k in inf.state_dict())
    ids = torch.randint(0, m.config.vocab_size, (2, 13), device=DEV)
    ref = official_reference({k: v.cpu() for k, v in m.state_dict().items()}, m.config, ids.cpu())
    got = inf(ids).logits
    assert rel_err(got.cpu(), ref) <= 1e-4
    assert rel_err(m(ids).logits.cpu(), ref) <= 1e-4
    # every distinct token read its row of all layers (the disk tier dedupes repeats)
    assert inf.lut.stats.bytes_read[tier] >= ids.unique().numel() * inf.lut.row_bytes


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tier", TIERS)
def test_inference_form_half_lut(dtype, tier):
    m = tiny_mole().to(DEV)
    inf = m.reparameterize(placement=tier, dtype=dtype, progress=False)
    assert inf.lut.dtype == dtype
    ids = torch.randint(0, m.config.vocab_size, (2, 10), device=DEV)
    got = inf(ids).logits.cpu()
    sd = {k: v.cpu() for k, v in m.state_dict().items()}
    # (1) Exact emulation: the float64 reference fed the *rounded* LUT is the same computation,
    # so only float32 arithmetic separates them: the fp32 bound applies.
    lut64 = inf.lut.read().cpu().double()
    emul = official_reference(sd, m.config, ids.cpu(), expert_rows=lambda l, i: lut64[i, l])
    assert rel_err(got, emul) <= 1e-4
    # (2) Against the unrounded model. Rounding perturbs each LUT entry by at most u*|x| (u the
    # unit roundoff), so layer l's expert term moves by at most u*max|LUT_l| (the softmax
    # weights sum to 1). To first order the logits move by sum_l J_l * that, and in these
    # small-init models the residual-to-logit gain J is O(1) while max|LUT| < max|logits|, so
    # max|dlogits| <= L * u * max|logits|. Measured: ~0.2u, so the bound has a 10x margin and
    # still fails when a LUT of the wrong dtype (or unrounded-vs-double mixups) slips in.
    ref = official_reference(sd, m.config, ids.cpu())
    err = rel_err(got, ref)
    u = UNIT_ROUNDOFF[dtype]
    assert err <= m.config.num_hidden_layers * u
    assert err > 1e-7  # the rounding is really there (a fp32 LUT would give ~1e-7)


@torch.no_grad()
def test_reparameterize_errors():
    m = tiny_mole()
    with pytest.raises(ValueError, match="dtype"):
        m.reparameterize(dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match="placement"):
        m.reparameterize(placement="vram", progress=False)
    inf = m.reparameterize(progress=False)
    with pytest.raises(RuntimeError, match="already"):
        inf.reparameterize(progress=False)
    from mole_kernels.table import LookupTable

    with pytest.raises(ValueError, match="shape"):
        inf.set_lut(LookupTable.from_tensor(torch.zeros(5, 2, 3, 48), "host"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        inf(torch.tensor([[0, m.config.vocab_size]]))


# ---------------------------------------------------------------- generation --------------


@torch.no_grad()
def test_greedy_generation_train_equals_inference_fp32():
    m = tiny_mole().to(DEV)
    inf = m.reparameterize(placement="host", progress=False)
    ids = torch.randint(0, m.config.vocab_size, (1, 6), device=DEV)
    a = m.generate(ids, max_new_tokens=12)
    b = inf.generate(ids, max_new_tokens=12)
    assert a.shape == (1, 18)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :6], ids)


@torch.no_grad()
@pytest.mark.parametrize("form", ["train", "inference"])
def test_kv_cache_logits_match_full_forward(form):
    m = tiny_mole().to(DEV)
    model = m if form == "train" else m.reparameterize(placement="disk", progress=False)
    ids = torch.randint(0, m.config.vocab_size, (2, 5), device=DEV)
    out = model.generate(ids, max_new_tokens=7, return_logits=True)
    full = model(out.sequences).logits
    assert out.logits.shape == (2, 7, m.config.vocab_size)
    assert rel_err(out.logits, full[:, 4:11]) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("form", ["train", "inference"])
def test_left_padded_batch_equals_each_prompt_alone(form):
    m = tiny_mole().to(DEV)
    model = m if form == "train" else m.reparameterize(placement="host", progress=False)
    V = m.config.vocab_size
    prompts = [torch.randint(0, V, (n,)) for n in (6, 3, 1)]
    S = 6
    ids = torch.full((3, S), 7, dtype=torch.long)  # pad with a real id: the mask must hide it
    mask = torch.zeros(3, S, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, S - len(p):] = p
        mask[i, S - len(p):] = 1
    batch = model.generate(ids.to(DEV), mask.to(DEV), max_new_tokens=8, return_logits=True)
    full = model(ids.to(DEV), attention_mask=mask.to(DEV)).logits
    for i, p in enumerate(prompts):
        alone = model.generate(p[None].to(DEV), max_new_tokens=8, return_logits=True)
        assert torch.equal(batch.sequences[i, S:], alone.sequences[0, len(p):])
        assert rel_err(batch.logits[i], alone.logits[0]) <= 1e-5
        # forward with a mask: real positions equal the unpadded forward
        assert rel_err(full[i, S - len(p):], model(p[None].to(DEV)).logits[0]) <= 1e-5


@torch.no_grad()
def test_generation_rejects_right_padding_and_bad_args():
    m = tiny_mole()
    ids = torch.randint(0, m.config.vocab_size, (2, 4))
    with pytest.raises(ValueError, match="left-padded"):
        m.generate(ids, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        m.generate(ids, torch.ones(2, 3), max_new_tokens=2)
    with pytest.raises(ValueError, match="cuda_graph"):  # the model is on the CPU on every machine
        m.generate(ids, max_new_tokens=2, cuda_graph=True)


@torch.no_grad()
def test_eos_stops_and_pads():
    m = tiny_mole()
    ids = torch.randint(0, m.config.vocab_size, (2, 4))
    free = m.generate(ids, max_new_tokens=10)
    eos = int(free[0, 6])  # row 0's third new token
    out = m.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    for r in range(2):
        new = out[r, 4:].tolist()
        ref = free[r, 4:4 + len(new)].tolist()
        if eos in ref:
            k = ref.index(eos)
            assert new[:k + 1] == ref[:k + 1] and all(t == 0 for t in new[k + 1:])
        else:
            assert new == ref
    # generation ends as soon as every row has stopped
    single = m.generate(ids[:1], max_new_tokens=10, eos_token_id=eos)
    assert single.shape[1] == 4 + free[0, 4:].tolist().index(eos) + 1


@torch.no_grad()
def test_sampling():
    m = tiny_mole()
    ids = torch.randint(0, m.config.vocab_size, (2, 3))
    g = lambda s: torch.Generator().manual_seed(s)
    a = m.generate(ids, max_new_tokens=9, do_sample=True, temperature=1.5, generator=g(1))
    b = m.generate(ids, max_new_tokens=9, do_sample=True, temperature=1.5, generator=g(1))
    c = m.generate(ids, max_new_tokens=9, do_sample=True, temperature=1.5, generator=g(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = m.generate(ids, max_new_tokens=9)
    # top_k=1 and a tiny top_p both reduce sampling to the argmax
    assert torch.equal(m.generate(ids, max_new_tokens=9, do_sample=True, top_k=1, generator=g(3)), greedy)
    assert torch.equal(m.generate(ids, max_new_tokens=9, do_sample=True, top_p=1e-6, generator=g(4)), greedy)


@requires_cuda
@torch.no_grad()
@pytest.mark.parametrize("tier", ["device", "host"])
def test_cuda_graph_decode_matches_eager(tier):
    m = tiny_mole().cuda()
    inf = m.reparameterize(placement=tier, progress=False)
    ids = torch.randint(0, m.config.vocab_size, (2, 5), device="cuda")
    eager = inf.generate(ids, max_new_tokens=8, return_logits=True)
    graph = inf.generate(ids, max_new_tokens=8, return_logits=True, cuda_graph=True)
    assert torch.equal(eager.sequences, graph.sequences)
    assert rel_err(graph.logits, eager.logits) <= 1e-5
    assert torch.equal(m.generate(ids, max_new_tokens=8, cuda_graph=True), eager.sequences)


# ---------------------------------------------------------------- checkpoints -------------


def _official_rep_folder(m, path, dtype=torch.float16):
    """What the official reparameterize.py writes: rep weights + moe_table [V, L*E*D], all fp16."""
    from safetensors.torch import save_file

    sd = {k: v for k, v in m.state_dict().items() if ".experts." not in k and "expert_layernorm" not in k}
    with torch.no_grad():
        rows = []
        for layer in m.model.layers:
            x = layer.expert_layernorm(m.model.embed_tokens.weight)
            rows.append(torch.stack([e(x) for e in layer.experts], 1))
        table = torch.stack(rows, 1)
    sd[LUT_KEY] = table.reshape(table.shape[0], -1)
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**m.config.to_dict(), "architectures": ["MoleForCausalLM"], "hidden_act": "silu"}, f)


@torch.no_grad()
@pytest.mark.parametrize("safe", [True, False])
def test_train_folder_and_reparameterized_folder_give_the_same_logits(tmp_path, safe):
    m = tiny_mole()
    m.save_pretrained(tmp_path / "train", safe_serialization=safe)
    assert (tmp_path / "train" / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    cfg = json.loads((tmp_path / "train" / "config.json").read_text())
    for k in ["num_experts", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "rope_theta", "vocab_size"]:
        assert k in cfg
    train = MoLEForCausalLM.from_pretrained(tmp_path / "train")
    assert not train.is_reparameterized
    ids = torch.randint(0, m.config.vocab_size, (2, 8))
    ref = m(ids).logits
    assert torch.equal(train(ids).logits, ref)
    m.reparameterize(dtype=torch.float32, progress=False).save_pretrained(tmp_path / "rep", safe_serialization=safe)
    for tier in ["host", "disk"]:
        rep = MoLEForCausalLM.from_pretrained(tmp_path / "rep", placement=tier)
        assert rep.is_reparameterized and rep.lut.placement == tier
        assert rel_err(rep(ids).logits, ref) <= 1e-4


@torch.no_grad()
def test_official_reparameterized_fp16_folder_loads(tmp_path):
    m = tiny_mole()
    _official_rep_folder(m, tmp_path)
    rep = MoLEForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert rep.lut.dtype == torch.float16 and rep.dtype == torch.float32
    ids = torch.randint(0, m.config.vocab_size, (1, 9))
    # fp16 weights and LUT: the reference is the float64 model with the same fp16-rounded weights
    sd16 = {k: v.half().float() for k, v in m.state_dict().items()}
    lut64 = rep.lut.tensor.double()
    ref = official_reference(sd16, m.config, ids, expert_rows=lambda l, i: lut64[i, l])
    assert rel_err(rep(ids).logits, ref) <= 1e-4
    rep_bf16 = MoLEForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, lut_dtype="bf16")
    assert rep_bf16.lut.dtype == torch.bfloat16


@torch.no_grad()
def test_sharded_folder_loads(tmp_path):
    from safetensors.torch import save_file

    m = tiny_mole()
    sd = m.state_dict()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, tmp_path / name)
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    ids = torch.randint(0, m.config.vocab_size, (1, 5))
    assert torch.equal(MoLEForCausalLM.from_pretrained(tmp_path)(ids).logits, m(ids).logits)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        MoLEForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        MoLEForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MoLEForCausalLM.from_pretrained(tmp_path)
    m = tiny_mole()
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MoLEForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors: .*not a safetensors file"):
        MoLEForCausalLM.from_pretrained(tmp_path)
    from safetensors.torch import save_file

    sd = dict(m.state_dict())
    del sd["model.layers.1.router.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing 1 tensor.*router"):
        MoLEForCausalLM.from_pretrained(tmp_path)
    sd = dict(m.state_dict())
    sd["model.norm.weight"] = torch.ones(5)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight has shape"):
        MoLEForCausalLM.from_pretrained(tmp_path)
    save_file({"model.embed_tokens.weight": sd["model.embed_tokens.weight"]}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a MoLE checkpoint"):
        MoLEForCausalLM.from_pretrained(tmp_path)
    sd = {k: v for k, v in m.state_dict().items() if ".experts." not in k and "expert_layernorm" not in k}
    sd[LUT_KEY] = torch.zeros(m.config.vocab_size, 7)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="moe_table.weight has shape"):
        MoLEForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------- baselines ---------------


@torch.no_grad()
def test_dense_baseline_is_mole_without_experts():
    m = tiny_mole()
    for layer in m.model.layers:  # experts that output zero: MoLE reduces to the dense model
        for e in layer.experts:
            e.down_proj.weight.zero_()
    dense = DenseForCausalLM.from_mole(m)
    assert not any("expert" in k or "router" in k for k in dense.state_dict())
    ids = torch.randint(0, m.config.vocab_size, (2, 7))
    torch.testing.assert_close(dense(ids).logits, m(ids).logits, rtol=1e-6, atol=1e-6)
    assert dense.generate(ids, max_new_tokens=4).shape == (2, 11)
    # activated parameters: dense == MoLE minus experts, router and expert norms
    n_dense = sum(p.numel() for p in dense.parameters())
    n_inf = sum(p.numel() for k, p in m.named_parameters() if "expert" not in k and "router" not in k)
    assert n_dense == n_inf


@torch.no_grad()
def test_moe_baseline_topk_and_offload():
    cfg = tiny_config(moe_num_experts=5, moe_top_k=2)
    moe = MoEForCausalLM(cfg, init_std=0.2).eval()
    assert cfg.moe_intermediate_size == cfg.intermediate_size // 2  # same activated FFN as MoLE
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    resident = moe(ids).logits

    # float64 reference of the routed FFN on one layer's input
    layer = moe.model.layers[0]
    x = torch.randn(9, cfg.hidden_size, dtype=torch.float64)
    lay64 = copy.deepcopy(layer).double()
    p = torch.softmax(lay64.router(x), -1)
    w, sel = p.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.stack([sum(w[t, j] * lay64.experts[int(sel[t, j])](x[t]) for j in range(2)) for t in range(9)])
    # _ffn returns h + moe(norm(h)): with an identity norm, _ffn(x) - x is the routed sum on x itself
    lay64.post_attention_layernorm = torch.nn.Identity()
    moe64 = copy.deepcopy(moe).double()
    moe64.model.layers[0] = lay64
    got = moe64._ffn(0, lay64, x[None], None)[0] - x
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    held = sum(p.numel() * p.element_size() for n, p in moe.named_parameters() if ".experts." in n)
    moe.offload_experts()
    assert moe.offloaded and moe.host_bytes == held
    assert all(p.numel() == 0 for n, p in moe.named_parameters() if ".experts." in n)
    torch.testing.assert_close(moe(ids).logits, resident, rtol=1e-6, atol=1e-6)
    st = moe.offload_stats
    per_expert = held // (cfg.num_hidden_layers * cfg.moe_num_experts)
    assert st.bytes_h2d == st.expert_copies * per_expert
    assert cfg.num_hidden_layers * 2 <= st.expert_copies <= cfg.num_hidden_layers * cfg.moe_num_experts
    assert moe.generate(ids, max_new_tokens=3).shape == (2, 9)
