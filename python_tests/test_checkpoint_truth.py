"""Checkpoints read exactly as torch (``torch.load(weights_only=True)``) and the safetensors library
read them, and saves that never lose the old model.

- crafted ``.bin`` files (compressed records, a BUILD that re-points a tensor, one storage key
  under two dtypes, duplicate zip names, a BUILD on a global, a huge memo index): what
  ``from_pretrained`` serves on every tier equals what torch loads, or the file is refused as torch
  refuses it; the reader keeps no state between files and its memory is bounded by the file's;
- safetensors headers: accepted exactly when the safetensors library accepts them;
- a property test: random state dicts (every float dtype, shared storages, views with offsets,
  non-contiguous tensors) saved by ``torch.save``, as written and re-zipped with compression,
  read byte for byte as ``torch.load`` reads them, and through ``from_pretrained`` on every tier;
- a kill test: SIGTERM and SIGKILL at random instants of ``save_pretrained`` and of
  ``mole-kernels reparameterize --to`` always leave the old or the new model loadable, and the
  next save removes what a killed one left behind.
"""
import collections
import io
import json
import os
import pickle
import random
import signal
import struct
import time
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mole_kernels import cli
from mole_kernels.model import MoLEConfig, MoLEForCausalLM
from mole_kernels.model.checkpoints import LUT_KEY, WeightFiles

W = "test"
TIERS = ["host", "disk"] + (["device"] if torch.cuda.is_available() else [])
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


# ------------------------------------------------------------------ crafting .bin files --------

class _Storage:
    """A storage reference in a hand-made ``torch.save`` pickle."""

    def __init__(self, key, stype, numel):
        self.key, self.stype, self.numel = key, stype, numel


class _Tensor:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride)``, optionally followed by a
    BUILD with ``state`` (torch then calls ``tensor.set_(*state)``)."""

    def __init__(self, storage, offset, size, stride, state=None):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())
        self.state = state

    def __reduce__(self):
        if self.state is None:
            return torch._utils._rebuild_tensor_v2, self.args
        return torch._utils._rebuild_tensor_v2, self.args, self.state


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.stype, obj.key, "cpu", obj.numel)
        return None


def _pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_bin(path, pkl: bytes, records: dict, *, compress=False, extra=()):
    """A torch.save-style zip: archive/data.pkl, archive/data/<key> for each record, byteorder,
    version; ``extra``: more (name, bytes) entries appended (duplicates allowed)."""
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", mode) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
        for name, data in extra:
            with pytest.warns(UserWarning, match="Duplicate name"):
                z.writestr(name, data)


def rezip(src, dst, compress=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(src) as zs, zipfile.ZipFile(dst, "w", compress) as zd:
        for info in zs.infolist():
            zd.writestr(info.filename, zs.read(info))


def raw(t):
    # A fresh row-major copy: .contiguous() keeps a 1-element tensor's odd stride, which view() then refuses.
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).view(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------ a tiny model ----------------

CFG = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
           num_experts=2)


def tiny_inference_sd(seed=0, lut_dtype=torch.float16):
    torch.manual_seed(seed)
    train = MoLEForCausalLM(MoLEConfig(**CFG)).eval()
    inf = train.reparameterize(placement="host", dtype=lut_dtype, device="cpu", progress=False)
    sd = dict(inf.state_dict())
    V, L, E, D = inf.config.lut_shape
    sd[LUT_KEY] = inf.lut.read().reshape(V, L * E * D).clone()
    return inf, sd


def folder_with(tmp_path, name, inf):
    folder = tmp_path / name
    folder.mkdir()
    cfg = inf.config.to_dict()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def assert_loads_as_torch(folder, bin_path):
    """from_pretrained of ``folder`` (every tier) holds exactly what torch.load gives for its .bin."""
    want = torch.load(bin_path, map_location="cpu", weights_only=True)
    for tier in TIERS:
        m = MoLEForCausalLM.from_pretrained(folder, placement=tier)
        got = m.state_dict()
        for k, v in want.items():
            if k == LUT_KEY:
                lut = m.lut.read().cpu()
                assert lut.dtype == v.dtype and raw(lut) == raw(v), (tier, k)
            else:
                assert got[k].dtype == v.dtype and raw(got[k].cpu()) == raw(v), (tier, k)
        m.lut.close()


# ------------------------------------------------------------------ the crafted cases -----------

def test_compressed_bin_loads_as_torch_loads_it(tmp_path):
    inf, sd = tiny_inference_sd()
    folder = folder_with(tmp_path, "m", inf)
    plain = tmp_path / "plain.bin"
    torch.save(sd, plain)
    rezip(plain, folder / "pytorch_model.bin")
    assert WeightFiles([str(folder / "pytorch_model.bin")], W).locate(LUT_KEY) is None  # never served in place
    assert_loads_as_torch(folder, folder / "pytorch_model.bin")


def _records_of(sd):
    """(pickled dict of _Tensor, records) for a dict of contiguous tensors, one storage each."""
    stypes = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage, torch.bfloat16: torch.BFloat16Storage}
    obj, records = collections.OrderedDict(), {}
    for i, (k, v) in enumerate(sd.items()):
        s = _Storage(str(i), stypes[v.dtype], v.numel())
        obj[k] = _Tensor(s, 0, v.shape, v.stride())
        records[str(i)] = raw(v)
    return obj, records


def test_build_after_the_lut_record_is_what_torch_builds(tmp_path):
    inf, sd = tiny_inference_sd()
    folder = folder_with(tmp_path, "m", inf)
    obj, records = _records_of(sd)
    lut = sd[LUT_KEY]
    other = torch.randn(lut.numel() + 7).half()  # the tensor the BUILD re-points the LUT to, at an offset
    records["x"] = raw(other)
    obj[LUT_KEY].state = (_Storage("x", torch.HalfStorage, other.numel()), 7, tuple(lut.shape), lut.stride())
    path = folder / "pytorch_model.bin"
    write_bin(path, _pickle(obj), records)
    want = torch.load(path, weights_only=True)[LUT_KEY]
    assert torch.equal(want, other[7:].view(lut.shape)) and not torch.equal(want, lut)  # torch's meaning
    assert_loads_as_torch(folder, path)


def test_one_storage_key_under_two_dtypes_is_what_torch_builds(tmp_path):
    inf, sd = tiny_inference_sd(lut_dtype=torch.float16)
    folder = folder_with(tmp_path, "m", inf)
    obj, records = _records_of(sd)
    lut = sd[LUT_KEY]
    # A float32 tensor first takes the key; the LUT names the same key as a HalfStorage: torch
    # caches the storage under its first dtype, so the LUT is float32 (and the config's LUT
    # shape then needs half the elements: the file is refused, or read as float32 bytes).
    first = torch.randn(lut.numel())
    obj = collections.OrderedDict([("aaa.first", _Tensor(_Storage("k", torch.FloatStorage, first.numel()), 0,
                                                         first.shape, (1,)))] + list(obj.items()))
    records["k"] = raw(first)
    obj[LUT_KEY] = _Tensor(_Storage("k", torch.HalfStorage, lut.numel()), 0, lut.shape, lut.stride())
    path = folder / "pytorch_model.bin"
    write_bin(path, _pickle(obj), records)
    want = torch.load(path, weights_only=True)
    assert want[LUT_KEY].dtype == torch.float32
    wf = WeightFiles([str(path)], W)
    assert wf.shapes[LUT_KEY] == (tuple(lut.shape), torch.float32) and wf.locate(LUT_KEY) is None
    got = wf.load()
    assert all(raw(got[k]) == raw(v) and got[k].dtype == v.dtype for k, v in want.items())
    with pytest.raises(ValueError, match="aaa.first"):  # not a tensor of this model: refused, never mis-served
        MoLEForCausalLM.from_pretrained(folder, placement="disk")


def test_duplicate_zip_names_load_as_torch_loads_them(tmp_path):
    inf, sd = tiny_inference_sd()
    folder = folder_with(tmp_path, "m", inf)
    obj, records = _records_of(sd)
    lut_key = str(list(sd).index(LUT_KEY))
    path = folder / "pytorch_model.bin"
    write_bin(path, _pickle(obj), records, extra=[(f"archive/data/{lut_key}", raw(torch.randn(sd[LUT_KEY].shape)
                                                                                 .half()))])
    assert WeightFiles([str(path)], W).locate(LUT_KEY) is None
    assert_loads_as_torch(folder, path)


def test_a_refused_build_on_a_global_leaves_no_state_behind(tmp_path):
    inf, sd = tiny_inference_sd(lut_dtype=torch.float32)
    hostile = tmp_path / "hostile.bin"
    # GLOBAL torch.FloatStorage, then BUILD {dtype: float16} on it: torch refuses the file; a reader
    # with shared stand-ins would have been changed for every later file.
    pkl = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x04\x00\x00\x00halfsb."
    write_bin(hostile, pkl, {})
    with pytest.raises(ValueError, match="hostile.bin"):
        WeightFiles([str(hostile)], W)
    folder = folder_with(tmp_path, "m", inf)
    torch.save(sd, folder / "pytorch_model.bin")
    loc = WeightFiles([str(folder / "pytorch_model.bin")], W).locate(LUT_KEY)
    assert loc is not None and loc.dtype == torch.float32  # still served in place, as float32
    m = MoLEForCausalLM.from_pretrained(folder, placement="disk")
    assert m.lut.dtype == torch.float32 and torch.equal(m.lut.read().reshape(sd[LUT_KEY].shape), sd[LUT_KEY])
    m.lut.close()


def _peak_rise(fn):
    def hwm():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) << 10

    open("/proc/self/clear_refs", "w").write("5")
    before = hwm()
    out = fn()
    return hwm() - before, out


def test_a_huge_memo_index_costs_no_memory(tmp_path):
    sd = {"w": torch.randn(4)}
    f = tmp_path / "ok.bin"
    torch.save(sd, f)
    with zipfile.ZipFile(f) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert pkl.startswith(b"\x80\x02}")  # PROTO 2, EMPTY_DICT
    big = pkl[:3] + b"r" + struct.pack("<I", 2 ** 27) + pkl[3:]  # LONG_BINPUT 2**27: memo the dict there
    path = tmp_path / "memo.bin"
    with zipfile.ZipFile(f) as zs, zipfile.ZipFile(path, "w") as zd:
        for info in zs.infolist():
            zd.writestr(info.filename, big if info.filename.endswith("data.pkl") else zs.read(info))
    assert torch.equal(torch.load(path, weights_only=True)["w"], sd["w"])
    rise, got = _peak_rise(lambda: WeightFiles([str(path)], W).load())
    assert torch.equal(got["w"], sd["w"])
    assert rise < 64 << 20, rise  # the C unpickler's array memo would take 1 GiB here


# ------------------------------------------------------------------ safetensors ------------------

def _st_file(path, header: bytes, data_len: int):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"\0" * data_len)


def _entry(a, b, dtype="F32"):
    return {"dtype": dtype, "shape": [(b - a) // 4], "data_offsets": [a, b]}


_E = b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]'
SAFE_HEADERS = [
    ("ok", json.dumps({"a": _entry(0, 8), "b": _entry(8, 16)}).encode(), 16),
    ("out of order", json.dumps({"b": _entry(8, 16), "a": _entry(0, 8)}).encode(), 16),
    ("duplicate name, data appended", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                      b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', 16),
    ("duplicate name, same entry", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                   b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    ("overlap", json.dumps({"a": _entry(0, 8), "b": _entry(4, 12)}).encode(), 16),
    ("gap", json.dumps({"a": _entry(0, 8), "b": _entry(12, 20)}).encode(), 20),
    ("not from 0", json.dumps({"a": _entry(4, 12)}).encode(), 12),
    ("bytes appended", json.dumps({"a": _entry(0, 8)}).encode(), 12),
    ("trailing spaces", json.dumps({"a": _entry(0, 8)}).encode() + b"   ", 8),
    ("NaN", b'{"__metadata__":{"x":NaN},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    ("deep", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 3000 + b"]" * 3000 + b"}}", 8),
    ("long int", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,' + b"9" * 5000 + b"]}}", 8),
    ("float offset", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', 8),
    ("lone surrogate", b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    ("zero-size twins", json.dumps({"a": _entry(0, 0), "b": _entry(0, 0), "c": _entry(0, 4)}).encode(), 4),
    ("unknown dtype", json.dumps({"a": _entry(0, 8, "F33")}).encode(), 8),
    ("sub-byte", b'{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}', 2),
    ("sub-byte misaligned", b'{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2),
    ("overflow", b'{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}}', 0),
    ("duplicate metadata", b'{"__metadata__":{},"__metadata__":{},"a":{"dtype":"F32","shape":[2],'
                           b'"data_offsets":[0,8]}}', 8),
    ("depth 125", b'{' + _E + b',"x":' + b"[" * 125 + b"]" * 125 + b"}}", 8),
    ("depth 126", b'{' + _E + b',"x":' + b"[" * 126 + b"]" * 126 + b"}}", 8),
    ("1e400 unknown field", b'{' + _E + b',"x":1e400}}', 8),
    ("400-digit int unknown field", b'{' + _E + b',"x":' + b"9" * 400 + b"}}", 8),
    ("25-digit int unknown field", b'{' + _E + b',"x":' + b"9" * 25 + b"}}", 8),
    ("-0 unknown field", b'{' + _E + b',"x":-0}}', 8),
    ("-0 in a shape", b'{"a":{"dtype":"F32","shape":[-0,2],"data_offsets":[0,0]}}', 0),
    ("lone surrogate unknown field", b'{' + _E + b',"x":"\\ud800"}}', 8),
    ("dtype twice", b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    ("unknown field twice", b'{' + _E + b',"x":1,"x":2}}', 8),
    ("metadata key twice", b'{"__metadata__":{"k":"1","k":"2"},' + _E + b'}}', 8),
    ("metadata null", b'{"__metadata__":null,' + _E + b'}}', 8),
    ("metadata empty list", b'{"__metadata__":[],' + _E + b'}}', 8),
    ("float unknown field", b'{' + _E + b',"x":1.5}}', 8),
    ("bool in a shape", b'{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4),
    ("control character", b'{"a\x01":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    ("UTF-8 BOM", b"\xef\xbb\xbf{" + _E + b"}}", 8),
    ("metadata value an object", b'{"__metadata__":{"k":{"a":1}},' + _E + b'}}', 8),
]


@pytest.mark.parametrize("name,header,data_len", SAFE_HEADERS, ids=[c[0] for c in SAFE_HEADERS])
def test_safetensors_accepted_exactly_when_the_library_accepts(tmp_path, name, header, data_len):
    f = str(tmp_path / "model.safetensors")
    _st_file(f, header, data_len)
    try:
        with safe_open(f, "pt") as h:
            library = {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    except Exception:
        library = None
    if library is None:
        with pytest.raises(ValueError, match=f"{W}: .*model.safetensors"):
            WeightFiles([f], W)
    else:
        assert {k: s for k, (s, _) in WeightFiles([f], W).shapes.items()} == library


# ------------------------------------------------------------------ the property test ------------

@st.composite
def state_dicts(draw):
    """Random state dicts: every float dtype, storages shared between tensors, views at offsets,
    non-contiguous (transposed, strided) tensors, empty ones."""
    sd = {}
    for b in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(FLOATS))
        n = draw(st.integers(0, 40))
        base = torch.randn(n).to(dtype) if n else torch.empty(0, dtype=dtype)
        for v in range(draw(st.integers(1, 3))):
            name = f"b{b}.v{v}"
            kind = draw(st.sampled_from(["whole", "offset", "matrix", "transposed", "strided"]))
            if kind == "whole" or n < 4:
                sd[name] = base
            elif kind == "offset":
                a = draw(st.integers(1, n - 1))
                sd[name] = base[a:]
            elif kind == "strided":
                sd[name] = base[draw(st.integers(0, 2))::draw(st.integers(2, 3))]
            else:
                rows = draw(st.integers(1, n // 2))
                m = base[: rows * (n // rows)].view(rows, n // rows)
                sd[name] = m.t() if kind == "transposed" else m
    return sd


def _assert_same_as_torch(path):
    want = torch.load(path, map_location="cpu", weights_only=True)
    wf = WeightFiles([str(path)], W)
    assert {k: s for k, s in wf.shapes.items()} == {k: (tuple(v.shape), v.dtype) for k, v in want.items()}
    got = wf.load()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].stride() == v.stride(), k
        assert raw(got[k]) == raw(v), k
        loc = wf.locate(k)
        if loc is not None:
            fd = os.open(loc.file, os.O_RDONLY)
            try:
                assert os.pread(fd, loc.nbytes, loc.offset) == raw(v), k
            finally:
                os.close(fd)
    # storages shared exactly where torch shares them
    ptr = {k: (v.untyped_storage().data_ptr(), v.storage_offset()) for k, v in want.items() if v.numel()}
    for a in ptr:
        for b in ptr:
            same_t = want[a].untyped_storage().data_ptr() == want[b].untyped_storage().data_ptr()
            same_g = got[a].untyped_storage().data_ptr() == got[b].untyped_storage().data_ptr()
            assert same_t == same_g, (a, b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sd=state_dicts())
def test_random_state_dicts_read_as_torch_reads_them(tmp_path_factory, sd):
    d = tmp_path_factory.mktemp("p")
    plain, deflated = d / "plain.bin", d / "deflated.bin"
    torch.save(sd, plain)
    rezip(plain, deflated)
    _assert_same_as_torch(plain)
    _assert_same_as_torch(deflated)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lut_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       other_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       lut_view=st.sampled_from(["whole", "offset", "transposed"]), tie=st.booleans(), compress=st.booleans())
def test_random_checkpoints_load_through_from_pretrained_as_torch_loads_them(tmp_path_factory, lut_dtype, other_dtype,
                                                                            lut_view, tie, compress):
    d = tmp_path_factory.mktemp("m")
    inf, sd = tiny_inference_sd(lut_dtype=lut_dtype)
    sd = {k: v.to(other_dtype) if k != LUT_KEY else v for k, v in sd.items()}
    lut = sd[LUT_KEY]
    if lut_view == "offset":  # the LUT a view at an offset of a storage it shares with a weight
        big = torch.cat([sd["model.norm.weight"].to(lut_dtype), lut.reshape(-1)])
        sd["model.norm.weight"] = big[:lut.shape[1] // CFG["num_hidden_layers"] // CFG["num_experts"]]
        sd[LUT_KEY] = big[big.numel() - lut.numel():].view(lut.shape)
    elif lut_view == "transposed":  # stored transposed: not servable in place, loaded as torch loads it
        sd[LUT_KEY] = lut.t().contiguous().t()
    if tie:  # lm_head and the embedding one storage
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    for k, v in list(sd.items()):  # some weights non-contiguous
        if v.dim() == 2 and k != LUT_KEY and k.endswith("proj.weight"):
            sd[k] = v.t().contiguous().t()
    folder = folder_with(d, "m", inf)
    torch.save(sd, d / "plain.bin")
    if compress:
        rezip(d / "plain.bin", folder / "pytorch_model.bin")
    else:
        os.replace(d / "plain.bin", folder / "pytorch_model.bin")
    assert_loads_as_torch(folder, folder / "pytorch_model.bin")


# ------------------------------------------------------------------ the kill test ----------------

def _model(seed):
    torch.manual_seed(seed)
    cfg = MoLEConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_experts=4)
    return MoLEForCausalLM(cfg).eval()


def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:  # the child: run, never return into pytest
        status = 1
        try:
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # as the command does
            fn()
            status = 0
        except BaseException:
            status = 3
        finally:
            os._exit(status)
    return pid


def _timed(fn) -> float:
    t0 = time.perf_counter()
    pid = _fork(fn)
    os.waitpid(pid, 0)
    return time.perf_counter() - t0


def _kill_at(fn, delay: float, sig) -> None:
    pid = _fork(fn)
    time.sleep(delay)
    os.kill(pid, sig)
    os.waitpid(pid, 0)


def _fingerprint(folder):
    """The lm_head of the model in ``folder`` (it must load)."""
    return MoLEForCausalLM.from_pretrained(folder).lm_head.weight.detach().clone()


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def test_killed_save_pretrained_always_leaves_a_loadable_model(tmp_path):
    torch.set_num_threads(1)  # the forked children must not inherit a busy thread pool
    folder = tmp_path / "m"
    models = [_model(s) for s in range(3)]
    heads = [m.lm_head.weight.detach().clone() for m in models]
    models[0].save_pretrained(folder)
    current = 0
    rng = random.Random(0)
    took = max(_timed(lambda: models[1].save_pretrained(folder, safe_serialization=False)) for _ in range(2))
    current = 1
    trials, outcomes = 0, {False: 0, True: 0}
    deadline = time.monotonic() + 10
    while trials < 40 and time.monotonic() < deadline:
        new = rng.choice([i for i in range(3) if i != current])
        safe = rng.random() < 0.5
        sig = signal.SIGKILL if trials % 2 else signal.SIGTERM
        _kill_at(lambda: models[new].save_pretrained(folder, safe_serialization=safe), rng.uniform(0, took * 1.3), sig)
        head = _fingerprint(folder)
        loaded = [i for i in (current, new) if torch.equal(head, heads[i])]
        assert loaded, f"trial {trials}: the folder holds neither the old nor the new model"
        outcomes[loaded[0] == new] += 1
        current = loaded[0]
        trials += 1
    print(f"{trials} killed saves: {outcomes[False]} left the old model, {outcomes[True]} the new one")
    assert trials >= 10
    models[2].save_pretrained(folder)  # a finished save removes what the killed ones left
    assert _leftovers(folder) == [] and torch.equal(_fingerprint(folder), heads[2])


def test_killed_reparameterize_command_always_leaves_a_loadable_model(tmp_path):
    torch.set_num_threads(1)
    train = tmp_path / "train"
    _model(5).save_pretrained(train)
    out = tmp_path / "out"
    old = _model(6)  # what --to holds before: another re-parameterized model
    old.reparameterize(placement="host", progress=False).save_pretrained(out)
    old_head = old.lm_head.weight.detach().clone()
    new_head = _fingerprint(train)
    argv = ["reparameterize", "--from", str(train), "--to", str(out), "--quiet"]
    took = _timed(lambda: cli.main(argv))
    assert torch.equal(_fingerprint(out), new_head)
    old.reparameterize(placement="host", progress=False).save_pretrained(out)
    rng = random.Random(1)
    current = old_head
    for trial in range(8):
        sig = signal.SIGKILL if trial % 2 else signal.SIGTERM
        _kill_at(lambda: cli.main(argv), rng.uniform(0.5 * took, took * 1.1), sig)
        m = MoLEForCausalLM.from_pretrained(out)
        assert m.is_reparameterized
        head = m.lm_head.weight.detach()
        assert torch.equal(head, current) or torch.equal(head, new_head), trial
        current = head.clone()
    assert cli.main(argv) == 0
    assert _leftovers(out) == []


# ------------------------------------------------------------------ outputs and sizes ------------

def test_outputs_that_are_not_regular_files_are_refused_before_any_work(tmp_path, capsys):
    train = tmp_path / "train"
    _model(0).save_pretrained(train)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rc = cli.main(["reparameterize", "--from", str(train), "--to", str(tmp_path / "out"), "--lut-file", str(fifo)])
    assert rc == 2 and "not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and os.path.exists(fifo) and not os.path.isfile(fifo)
    rc = cli.main(["reparameterize", "--from", str(train), "--to", str(tmp_path / "out"), "--lut-file", os.devnull])
    assert rc == 2 and "not a regular file" in capsys.readouterr().err
    from mole_kernels.table import LookupTable

    with LookupTable.from_tensor(torch.randn(4, 1, 2, 8), "host") as t:
        for bad in (fifo, os.devnull):
            with pytest.raises(ValueError, match="not a regular file"):
                t.save(bad)
    folder = tmp_path / "m"
    folder.mkdir()
    os.mkfifo(folder / "config.json")
    with pytest.raises(ValueError, match="not a regular file"):
        _model(0).save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json"]


@pytest.mark.parametrize("argv,match", [
    (["demo", "--vocab", "100000000000"], "--vocab"),
    (["demo", "--threads", "1000000000"], "--threads"),
    (["demo", "--save-model", ""], "--save-model"),
    (["demo", "--hidden", "1048576", "--heads", "4"], "memory"),
    (["quality", "--vocab", "100000000000"], "--vocab"),
    (["reparameterize", "--from", "x", "--to", ""], "--to"),
    (["quality", "--markdown", ""], "--markdown"),
])
def test_command_sizes_are_bounded_with_a_one_line_error(argv, match, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err


def _config_folder(tmp_path, **changes):
    folder = tmp_path / "m"
    _model(0).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_config_sizes_are_checked_against_the_weights_before_building(tmp_path):
    folder = _config_folder(tmp_path, num_hidden_layers=10 ** 6)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="num_hidden_layers=1000000 but the weights hold layers 0..1"):
        MoLEForCausalLM.from_pretrained(folder)
    assert time.perf_counter() - t0 < 10


def test_config_json_errors_name_the_file(tmp_path):
    folder = _config_folder(tmp_path)
    cfg = folder / "config.json"
    for text, match in [("[" * 100000 + "]" * 100000, "nested too deeply"),
                        ('{"vocab_size": ' + "9" * 5000 + "}", "not valid JSON"),
                        ('{"vocab_size": 1', "not valid JSON")]:
        cfg.write_text(text)
        with pytest.raises(ValueError, match=f"{cfg}.*({match})"):
            MoLEForCausalLM.from_pretrained(folder)
    for eps in ("1" + "0" * 400, "1e999"):  # an int too large for a float; a float that is inf
        c = json.dumps({**_model(0).config.to_dict(), "rms_norm_eps": 0.5}).replace("0.5", eps)
        cfg.write_text(c)
        with pytest.raises(ValueError, match=f"{cfg}.*rms_norm_eps"):
            MoLEForCausalLM.from_pretrained(folder)


def test_a_save_killed_after_its_commit_reads_as_the_new_model(tmp_path, monkeypatch):
    from mole_kernels import _files

    folder = tmp_path / "m"
    old, new = _model(0), _model(1)
    old.save_pretrained(folder, safe_serialization=False)
    real_finish = _files._finish

    def killed(*args):
        raise KeyboardInterrupt  # as if the process died right after the journal was published

    monkeypatch.setattr(_files, "_finish", killed)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder)  # the other format: the old .bin is stale once committed
    monkeypatch.setattr(_files, "_finish", real_finish)
    names = os.listdir(folder)
    assert _files.JOURNAL in names and "pytorch_model.bin" in names and "model.safetensors" not in names
    assert torch.equal(_fingerprint(folder), new.lm_head.weight)  # read through the journal
    old.save_pretrained(folder)  # the next save finishes the journal first, then commits its own
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert torch.equal(_fingerprint(folder), old.lm_head.weight)


def test_temporaries_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    from mole_kernels._files import atomic_write

    target = tmp_path / "lut.safetensors"
    dead = tmp_path / ".lut.safetensors.0123456789ab.tmp"
    dead.write_bytes(b"x" * 1000)
    live = tmp_path / ".lut.safetensors.ba9876543210.tmp"
    live.write_bytes(b"y")
    other = tmp_path / ".notes.txt.0123456789ab.tmp"  # another target's: not this write's to judge
    other.write_bytes(b"z")
    import fcntl

    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer that is still running holds its temporary file
    try:
        with atomic_write(target) as f:
            f.write(b"new")
        assert target.read_bytes() == b"new" and not dead.exists() and live.exists() and other.exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("compress", [False, True])
def test_tensor_parallel_reader_reads_the_bin_lut_as_torch(tmp_path, compress):
    from mole_kernels.model.tensor_parallel import _Checkpoint

    inf, sd = tiny_inference_sd(lut_dtype=torch.bfloat16)
    folder = folder_with(tmp_path, "m", inf)
    torch.save(sd, tmp_path / "plain.bin")
    if compress:
        rezip(tmp_path / "plain.bin", folder / "pytorch_model.bin")
    else:
        os.replace(tmp_path / "plain.bin", folder / "pytorch_model.bin")
    want = torch.load(folder / "pytorch_model.bin", weights_only=True)
    ckpt = _Checkpoint(str(folder), W)
    shape, dtype, read = ckpt.lut_source(W)
    assert dtype == torch.bfloat16 and raw(read(0, shape[0]).reshape(want[LUT_KEY].shape)) == raw(want[LUT_KEY])
    assert raw(ckpt.get("lm_head.weight")) == raw(want["lm_head.weight"])
