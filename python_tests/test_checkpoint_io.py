"""The checkpoint-file layer under from_pretrained/save_pretrained: tensors located in place in
safetensors and torch .bin files (checked against torch.load / safetensors / the bytes at the
location), loads that skip a tensor without reading it, and the streaming safetensors writer."""
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import mole_kernels
from mole_kernels.model.checkpoints import StreamedTensor, TensorLocation, WeightFiles, _weight_files, save_checkpoint
from mole_kernels.table.file_format import _read_header

W = "test"


def tensor_names(files, where):
    return {k: wf.path for k, wf in WeightFiles(files, where).holder.items()}


def locate_tensor(files, name, where):
    return WeightFiles(files, where).locate(name)


def _load_state_dict(files, where, skip=frozenset()):
    return WeightFiles(files, where).load(skip)


def pread_tensor(loc: TensorLocation) -> torch.Tensor:
    """The tensor at a location, read with os.pread (independent of the code under test)."""
    if loc.nbytes == 0:
        return torch.empty(loc.shape, dtype=loc.dtype)
    fd = os.open(loc.file, os.O_RDONLY)
    try:
        raw = os.pread(fd, loc.nbytes, loc.offset)
    finally:
        os.close(fd)
    assert len(raw) == loc.nbytes
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(loc.dtype).reshape(loc.shape)


def state_dict():
    base = torch.randn(6, 8)
    return {"lut16": torch.randn(5, 12).half(), "lutbf": torch.randn(7, 4).bfloat16(), "w32": base,
            "view": base[2:], "row": base[3], "vec": torch.randn(3), "empty": torch.zeros(0, 4, dtype=torch.float16),
            "ids": torch.arange(5), "t": base.t(), "p": nn.Parameter(torch.randn(2, 3).half())}


FLOATS = ("lut16", "lutbf", "w32", "view", "row", "vec", "empty", "p")


# ------------------------------------------------------------------ safetensors --------------

def test_safetensors_locations_match_the_file(tmp_path):
    sd = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state_dict().items() if k != "view"}
    f = str(tmp_path / "model.safetensors")
    save_file(sd, f)
    with safe_open(f, "pt") as h:
        assert set(tensor_names([f], W)) == set(h.keys())
    ref = load_file(f)
    for k, v in ref.items():
        loc = locate_tensor([f], k, W)
        if v.dtype == torch.int64:
            assert loc is None
            continue
        assert loc.dtype == v.dtype and loc.shape == tuple(v.shape) and loc.nbytes == v.numel() * v.element_size()
        assert torch.equal(pread_tensor(loc), v)
    assert locate_tensor([f], "absent", W) is None


def test_sharded_folder(tmp_path):
    sd = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state_dict().items() if k not in ("view", "t")}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:4], "model-00002-of-00002.safetensors": keys[4:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / name)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    files = _weight_files(str(tmp_path), W)
    names = tensor_names(files, W)
    assert {k: os.path.basename(f) for k, f in names.items()} == {k: n for n, ks in shards.items() for k in ks}
    loc = locate_tensor(files, "vec", W)
    assert loc.file == names["vec"] and torch.equal(pread_tensor(loc), sd["vec"])
    assert _load_state_dict(files, W, skip=frozenset({"lut16"})).keys() == set(sd) - {"lut16"}
    # a tensor in two shards: a ValueError naming the file, from every entry point
    save_file({"vec": sd["vec"]}, tmp_path / "model-00002-of-00002.safetensors")
    save_file({"vec": sd["vec"], "w32": sd["w32"]}, tmp_path / "model-00001-of-00002.safetensors")
    for call in (lambda: tensor_names(files, W), lambda: locate_tensor(files, "vec", W),
                 lambda: _load_state_dict(files, W)):
        with pytest.raises(ValueError, match="model-00002-of-00002.safetensors repeats"):
            call()


def _rewrite_header(f, edit):
    raw = open(f, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    open(f, "wb").write(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("damage", ["short", "length", "json", "not_object", "entry", "size", "outside",
                                    "truncated"])
def test_safetensors_bad_header_is_a_value_error_naming_the_file(tmp_path, damage):
    f = str(tmp_path / "model.safetensors")
    save_file({"a": torch.randn(4, 4), "b": torch.randn(3).half()}, f)
    raw = open(f, "rb").read()
    if damage == "short":
        open(f, "wb").write(raw[:5])
    elif damage == "length":
        open(f, "wb").write(struct.pack("<Q", 1 << 40) + raw[8:])
    elif damage == "json":
        n = struct.unpack("<Q", raw[:8])[0]
        open(f, "wb").write(raw[:8] + b"{" * n + raw[8 + n:])
    elif damage == "not_object":
        open(f, "wb").write(struct.pack("<Q", 2) + b"[]")
    elif damage == "entry":
        _rewrite_header(f, lambda h: h["a"].update(shape="4x4"))
    elif damage == "size":
        _rewrite_header(f, lambda h: h["a"].update(shape=[4, 5]))
    elif damage == "outside":
        _rewrite_header(f, lambda h: h["b"].update(data_offsets=[1 << 30, (1 << 30) + 6]))
    else:
        open(f, "wb").write(raw[:-3])
    for call in (lambda: tensor_names([f], W), lambda: locate_tensor([f], "a", W)):
        with pytest.raises(ValueError, match=f"{W}: .*{f}"):
            call()


def test_load_skips_without_reading(tmp_path, monkeypatch):
    sd = {"lut": torch.randn(9, 4).half(), "w": torch.randn(3), "b": torch.randn(2).bfloat16()}
    f = str(tmp_path / "model.safetensors")
    save_file(sd, f)
    loc = locate_tensor([f], "lut", W)
    read, real_preadv = [], os.preadv

    def spy(fd, buffers, offset):  # records every byte range read
        n = real_preadv(fd, buffers, offset)
        read.append((offset, offset + n))
        return n

    monkeypatch.setattr(os, "preadv", spy)
    got = _load_state_dict([f], W, skip=frozenset({"lut"}))
    assert got.keys() == {"b", "w"} and sum(b - a for a, b in read) == 3 * 4 + 2 * 2
    assert not any(a < loc.offset + loc.nbytes and loc.offset < b for a, b in read)
    assert all(torch.equal(got[k], sd[k]) for k in got)
    assert not any(a <= v.untyped_storage().data_ptr() < b for v in got.values() for a, b in _file_mappings(f))


# ------------------------------------------------------------------ torch .bin ---------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bin_locations_match_torch_load(tmp_path, dtype):
    sd = state_dict()
    sd["lut"] = torch.randn(10, 6).to(dtype)
    sd["lut_view"] = sd["lut"][4:]  # storage_offset > 0, shares the storage
    sd["lut_col"] = sd["lut"][:, 2]  # a strided view
    f = str(tmp_path / "pytorch_model.bin")
    torch.save(sd, f)
    ref = torch.load(f, weights_only=True)
    assert set(tensor_names([f], W)) == set(ref)
    reader = torch._C.PyTorchFileReader(f)
    for k, v in ref.items():
        loc = locate_tensor([f], k, W)
        if not v.is_floating_point() or not v.is_contiguous() or v.numel() == 0:  # (an empty storage has no record)
            assert loc is None, k
            continue
        assert loc is not None, k
        assert loc.file == f and loc.dtype == v.dtype and loc.shape == tuple(v.shape)
        assert torch.equal(pread_tensor(loc), v), k
    loc = locate_tensor([f], "lut", W)  # torch's own record offset agrees
    assert loc.offset in {reader.get_record_offset(r) for r in reader.get_all_records() if r.startswith("data/")}
    assert locate_tensor([f], "lut_view", W).offset == loc.offset + 4 * 6 * dtype.itemsize
    assert locate_tensor([f], "absent", W) is None


def test_bin_legacy_and_compressed_are_not_located(tmp_path):
    sd = {"lut": torch.randn(4, 4).half(), "w": torch.randn(2)}
    legacy = str(tmp_path / "legacy.bin")
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert locate_tensor([legacy], "lut", W) is None
    assert set(tensor_names([legacy], W)) == {"lut", "w"}
    assert torch.equal(_load_state_dict([legacy], W, skip=frozenset({"w"}))["lut"], sd["lut"])
    f = str(tmp_path / "pytorch_model.bin")
    torch.save(sd, f)
    deflated = str(tmp_path / "deflated.bin")
    with zipfile.ZipFile(f) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert locate_tensor([deflated], "lut", W) is None


def _with_data_pkl(src: str, dst: str, pkl: bytes) -> None:
    """A copy of a torch.save zip with its data.pkl replaced."""
    with zipfile.ZipFile(src) as zs, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zd:
        for info in zs.infolist():
            zd.writestr(info.filename, pkl if info.filename.endswith("/data.pkl") else zs.read(info))


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_bin_hostile_pickle_is_never_run(tmp_path):
    f = str(tmp_path / "ok.bin")
    torch.save({"lut": torch.randn(4, 4).half()}, f)
    marker = tmp_path / "ran"
    hostile = str(tmp_path / "pytorch_model.bin")
    _with_data_pkl(f, hostile, pickle.dumps({"lut": _Hostile(marker)}, protocol=2))
    assert b"system" in open(hostile, "rb").read()
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        tensor_names([hostile], W)  # torch's weights_only loader refuses it too
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        _load_state_dict([hostile], W)
    assert not marker.exists()


def test_bin_not_a_state_dict(tmp_path):
    f = str(tmp_path / "pytorch_model.bin")
    torch.save([torch.randn(2)], f)
    for call in (lambda: tensor_names([f], W), lambda: _load_state_dict([f], W)):
        with pytest.raises(ValueError, match=f"{f} does not hold a state dict"):
            call()
    open(f, "wb").write(b"PK\x03\x04 garbage")
    with pytest.raises(ValueError, match=f"cannot read weights from {f}"):
        tensor_names([f], W)


def _file_mappings(path: str):
    out = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(path):
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            out.append((a, b))
    return out


def test_bin_load_skips_and_copies_out_of_the_mapping(tmp_path):
    sd = state_dict()
    f = str(tmp_path / "pytorch_model.bin")
    torch.save(sd, f)
    got = _load_state_dict([f], W, skip=frozenset({"lut16", "t"}))
    assert got.keys() == set(sd) - {"lut16", "t"}
    for k, v in got.items():
        assert torch.equal(v, sd[k]) and v.dtype == sd[k].dtype
    assert isinstance(got["p"], nn.Parameter)
    # storages shared as in the file (as torch.load keeps them), and none of them is the file's mapping
    assert got["view"].untyped_storage().data_ptr() == got["w32"].untyped_storage().data_ptr()
    assert got["view"].storage_offset() == 16
    maps = _file_mappings(f)
    for v in got.values():
        ptr = v.untyped_storage().data_ptr()
        assert not any(a <= ptr < b for a, b in maps)


# ------------------------------------------------------------------ streaming save ------------

def rows_of(t: torch.Tensor, calls=None):
    def read_rows(a, b):
        if calls is not None:
            calls.append((a, b))
        return t[a:b].clone()
    return read_rows


def test_streamed_safetensors_round_trip(tmp_path, monkeypatch):
    for bound in ("_CHUNK_MIN", "_CHUNK_MAX"):  # the package's one chunk policy: 3 rows of the [V, 8] fp16 tensor
        monkeypatch.setattr(f"mole_kernels.table.file_format.{bound}", 3 * 8 * 2)
    lut = torch.randn(11, 8).half()
    big = torch.randn(5, 2, 3, 4).bfloat16()
    streamed_src = {"model.moe_table.weight": lut, "z_vec": torch.randn(7), "a_empty": torch.zeros(0, 5),
                    "table3": torch.randn(6, 2, 4), "table4": big}
    calls = []
    streamed = {k: StreamedTensor(tuple(v.shape), v.dtype, rows_of(v, calls if k == "model.moe_table.weight"
                                                                 else None)) for k, v in streamed_src.items()}
    sd = {"zeta": torch.randn(3, 3), "alpha": torch.randn(2).half(), "ids": torch.arange(4), "one": torch.tensor(1.5),
          "mask": torch.tensor([True, False]), "t": torch.randn(3, 4).t(), "bf": torch.randn(3).bfloat16()}
    save_checkpoint(str(tmp_path), sd, {"x": 1}, True, streamed)
    f = str(tmp_path / "model.safetensors")
    assert calls == [(0, 3), (3, 6), (6, 9), (9, 11)]
    want = {**sd, **streamed_src}
    got = load_file(f)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with safe_open(f, "pt") as h:
        assert h.metadata() == {"format": "pt"}
        for k in h.keys():
            assert torch.equal(h.get_tensor(k), want[k])
    raw = open(f, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    spans = sorted(e["data_offsets"] for k, e in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 8 + n + spans[-1][1] == len(raw)
    loc = locate_tensor([f], "model.moe_table.weight", W)
    assert torch.equal(pread_tensor(loc), lut)
    # the table reader takes the [V, E, D] and [V, L, E, D] forms ([V, L*E*D] it refuses by design)
    for k in ("table3", "table4"):
        info = _read_header(f, tensor=k)
        v = streamed_src[k]
        assert info.data_offset == loc.offset - header["model.moe_table.weight"]["data_offsets"][0] + \
            header[k]["data_offsets"][0]
        assert info.nbytes == v.numel() * v.element_size() and info.dtype == v.dtype
    assert json.loads((tmp_path / "config.json").read_text()) == {"x": 1}


def test_streamed_bin_is_materialized(tmp_path):
    lut = torch.randn(6, 4).bfloat16()
    calls = []
    save_checkpoint(str(tmp_path), {"w": torch.randn(2)}, {}, False,
                    {"lut": StreamedTensor((6, 4), torch.bfloat16, rows_of(lut, calls))})
    got = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert calls == [(0, 6)] and torch.equal(got["lut"], lut) and got.keys() == {"w", "lut"}


def test_streamed_save_replaces_the_folder_and_checks_the_rows(tmp_path):
    torch.save({"old": torch.randn(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (tmp_path / "config.json").write_text("{}")
    bad = StreamedTensor((4, 3), torch.float16, lambda a, b: torch.zeros(b - a, 3))  # wrong dtype
    with pytest.raises(ValueError, match=r"streamed tensor 'lut': read_rows\(0, 4\)"):
        save_checkpoint(str(tmp_path), {"w": torch.randn(2)}, {"new": 1}, True, {"lut": bad})
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model-00001-of-00002.safetensors", "pytorch_model.bin"]
    with pytest.raises(ValueError, match="both whole and streamed"):
        save_checkpoint(str(tmp_path), {"lut": torch.randn(2)}, {}, True,
                        {"lut": StreamedTensor((1,), torch.float32, lambda a, b: torch.zeros(b - a))})
    good = StreamedTensor((4, 3), torch.float16, lambda a, b: torch.ones(b - a, 3, dtype=torch.float16))
    save_checkpoint(str(tmp_path), {"w": torch.randn(2)}, {"new": 1}, True, {"lut": good})
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert torch.equal(load_file(tmp_path / "model.safetensors")["lut"], torch.ones(4, 3, dtype=torch.float16))


# ------------------------------------------------------------------ memory -------------------

def test_streaming_save_and_skipping_load_stay_small(tmp_path):
    """64 MiB tensors: written streamed, or skipped on load, raise the peak RSS by under 24 MiB
    (and loading one does raise it: the measure sees it)."""
    lut = torch.randn(1024, 16384)  # 64 MiB fp32
    save_file({"lut": lut, "w": torch.randn(8)}, tmp_path / "model.safetensors")
    torch.save({"lut": lut, "w": torch.randn(8)}, tmp_path / "pytorch_model.bin")
    del lut
    code = f"""
        import torch
        from mole_kernels.model.checkpoints import StreamedTensor, WeightFiles, save_checkpoint

        def status(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) << 10

        def peak_rise(fn):
            open("/proc/self/clear_refs", "w").write("5")
            before = status("VmHWM")
            out = fn()
            return (status("VmHWM") - before) >> 20, out

        rows = lambda a, b: torch.full((b - a, 16384), float(a))
        lut = StreamedTensor((1024, 16384), torch.float32, rows)
        save_checkpoint({str(tmp_path / 'warm')!r}, {{}}, {{}}, True, {{"lut": StreamedTensor((8, 16384), torch.float32, rows)}})
        print("save", peak_rise(lambda: save_checkpoint({str(tmp_path / 'out')!r}, {{"w": torch.randn(4)}}, {{}}, True,
                                                        {{"lut": lut}}))[0])
        for name in ("model.safetensors", "pytorch_model.bin"):
            f = {str(tmp_path)!r} + "/" + name
            rise, sd = peak_rise(lambda: WeightFiles([f], "t").load(skip=frozenset({{"lut"}})))
            assert set(sd) == {{"w"}}
            print("skip", rise)
            rise, sd = peak_rise(lambda: WeightFiles([f], "t").load())
            print("full", rise)
    """
    # A fixed malloc mmap threshold: glibc's dynamic one keeps up to ~2 freed chunks on the heap
    # after the first is freed (bounded allocator slack, not memory the writer holds).
    # The child imports the mole_kernels this process imported (not a source tree in the current folder).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(mole_kernels.__file__)))}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = [line.split() for line in proc.stdout.splitlines()]
    assert [k for k, _ in got] == ["save", "skip", "full", "skip", "full"], proc.stdout
    for k, mib in got:
        assert (int(mib) < 24) if k != "full" else (int(mib) >= 60), proc.stdout
    from mole_kernels.table.file_format import _chunk_rows

    step = _chunk_rows(16384 * 4, 1024 * 16384 * 4)  # the package's chunk policy: 64 rows (4 MiB) here
    lut = load_file(tmp_path / "out" / "model.safetensors")["lut"]  # chunks, each filled with its start
    assert torch.equal(lut[:, 0], torch.arange(1024).div(step, rounding_mode="floor").float() * step)
