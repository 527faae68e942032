"""LookupTable and Prefetcher: every tier and path against a float64 reference, files, release.

CPU runs cover all the logic (on a machine without CUDA the host tier is ordinary memory and
the dma/staged paths copy on the host); the CUDA tests at the end run the GPU paths for real.
"""
import gc
import json
import os
import struct

import pytest
import torch

from mole_kernels import dequantize, quantize
from mole_kernels.table import LookupTable, host_allocations

from conftest import FLOAT_DTYPES, TOLERANCES, requires_cuda

# (V, L, E, D): odd sizes, E = 1, L = 1.
SHAPES = [(37, 3, 2, 5), (11, 1, 1, 16), (23, 2, 3, 33)]
# (placement, path) for every path a CPU-device table can take.
TIER_PATHS = [("host", "zero_copy"), ("host", "dma"), ("disk", "staged")]


def make_lut(V, L, E, D, dtype):
    """Fresh random non-zero data (exact in every dtype's rounding of a float32)."""
    t = torch.rand(V, L, E, D) + 0.5
    return (t * torch.where(torch.rand(V, L, E, D) < 0.5, -1.0, 1.0)).to(dtype)


def random_ids(V, shape, dtype=torch.int64):
    ids = torch.randint(0, V, shape, dtype=dtype)
    if ids.numel() > 1:
        ids.view(-1)[-1] = ids.view(-1)[0]  # always a repeated id
    return ids


def ref_rows(lut, ids, layer=None):
    rows = lut.double()[ids.long()]
    return rows if layer is None else rows[..., layer, :, :]


def ref_combine(lut, ids, w, layer):
    return (lut.double()[ids.long()][..., layer, :, :] * w.double()[..., None]).sum(-2)


def tiny_staging(lut):
    """Staging whose halves hold two rows: every multi-row request is chunked."""
    row = lut.bytes_per_token if hasattr(lut, "bytes_per_token") else lut[0].numel() * lut.element_size()
    return 2 * 2 * row


@pytest.fixture
def tables():
    made = []

    def make(lut, placement, **kw):
        kw.setdefault("device", "cpu")
        if placement == "disk":
            kw.setdefault("staging_bytes", tiny_staging(lut))
        t = LookupTable.from_tensor(lut, placement, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


# ------------------------------------------------------------------ correctness ------------


@pytest.mark.parametrize("placement,path", TIER_PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gather_rows_exact(tables, placement, path, shape, dtype):
    lut = make_lut(*shape, dtype)
    t = tables(lut, placement)
    V, L = shape[:2]
    for id_shape in [(9,), (2, 5), (1,)]:
        ids = random_ids(V, id_shape)
        got = t.gather(ids, path=path)
        assert got.dtype == dtype and got.shape == (*id_shape, *shape[1:])
        assert torch.equal(got.double(), ref_rows(lut, ids))
        layer = L - 1
        got = t.gather(ids.int(), layer=layer, path=path)
        assert torch.equal(got.double(), ref_rows(lut, ids, layer))
        assert t.stats.last_path == path


@pytest.mark.parametrize("placement,path", TIER_PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gather_combine_matches_float64(tables, placement, path, shape, dtype):
    V, L, E, D = shape
    lut = make_lut(*shape, dtype)
    t = tables(lut, placement)
    ids = random_ids(V, (3, 4))
    w = torch.rand(3, 4, E)
    layer = L // 2
    got = t.gather_combine(ids, w, layer, path=path)
    assert got.dtype == dtype and got.shape == (3, 4, D)
    torch.testing.assert_close(got.double(), ref_combine(lut, ids, w, layer), **TOLERANCES[dtype], check_dtype=False)
    # out= is overwritten (poisoned first), accumulate adds into it.
    out = torch.full((3, 4, D), float("nan"))
    t.gather_combine(ids, w, layer, out=out, path=path)
    torch.testing.assert_close(out.double(), ref_combine(lut, ids, w, layer), atol=1e-5, rtol=1e-5)
    base = torch.randn(3, 4, D)
    acc = base.clone()
    t.gather_combine(ids, w, layer, out=acc, accumulate=True, path=path)
    torch.testing.assert_close(acc.double(), base.double() + ref_combine(lut, ids, w, layer), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("placement,path", TIER_PATHS)
def test_repeated_empty_and_out_of_range(tables, placement, path):
    V, L, E, D = 19, 2, 3, 7
    lut = make_lut(V, L, E, D, torch.float32)
    t = tables(lut, placement)
    ids = torch.tensor([4, 4, 4, 0, 18, 4, 0])
    t.reset_stats()
    assert torch.equal(t.gather(ids, path=path).double(), ref_rows(lut, ids))
    assert t.stats.rows_requested == 7
    if path != "zero_copy":  # dedupe: each unique row read once
        assert t.stats.unique_rows == 3
        assert t.stats.bytes_read[placement] == 3 * t.row_bytes
    else:
        assert t.stats.bytes_read[placement] == 7 * t.row_bytes
    for empty in [torch.empty(0, dtype=torch.int64), torch.empty(2, 0, dtype=torch.int32)]:
        assert t.gather(empty, path=path).shape == (*empty.shape, L, E, D)
        assert t.gather_combine(empty, torch.rand(*empty.shape, E), 1, path=path).shape == (*empty.shape, D)
    for bad in (-1, V, 1 << 40):
        with pytest.raises(ValueError, match=f"ids contains {bad}"):
            t.gather(torch.tensor([1, bad, 2]), path=path)
        with pytest.raises(ValueError, match=f"ids contains {bad}"):
            t.gather_combine(torch.tensor([bad]), torch.rand(1, E), 0, path=path)


def test_auto_path_and_3d_table(tables):
    lut3 = make_lut(13, 1, 4, 9, torch.float16)[:, 0]  # [V, E, D]
    t = tables(lut3, "host")
    assert t.shape == (13, 1, 4, 9)
    small, big = random_ids(13, (3,)), random_ids(13, (LookupTable.dma_min_tokens + 1,))
    assert torch.equal(t.gather(small)[:, 0], lut3[small]) and t.stats.last_path == "zero_copy"
    assert torch.equal(t.gather(big)[:, 0], lut3[big]) and t.stats.last_path == "dma"
    # the same choices, seen in the kernels run: the table in place, then its unique rows
    assert gathered_table_sizes(lambda: t.gather(small)) == [13]
    assert gathered_table_sizes(lambda: t.gather(big)) == [big.unique().numel()]
    w = torch.rand(3, 4)
    ref = (lut3.double()[small] * w.double()[..., None]).sum(1)
    torch.testing.assert_close(t.gather_combine(small, w, None).double(), ref, **TOLERANCES[torch.float16])


def gathered_table_sizes(fn):
    """Runs ``fn()`` and returns, for every gather kernel it ran, how many token rows the table it
    read from had: V when it read the table in place, U when it read deduplicated rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if name.startswith("mole_kernels.lut_gather"):  # lut_gather(_out) / lut_gather_quant(_out)
                table = args[1] if name.endswith("_out.default") else args[0]
                self.sizes.append(table.shape[0])
            return func(*args, **(kwargs or {}))

    with Spy() as spy:
        fn()
    return spy.sizes


@pytest.mark.parametrize("placement,path", TIER_PATHS)
@pytest.mark.parametrize("fmt", [None, "int8"])
def test_path_taken_shows_in_the_kernels_it_runs(tables, placement, path, fmt):
    """stats.last_path is set from the argument; this checks the path independently: zero-copy
    gathers from the whole table in place, the dedupe paths (dma, staged) from the unique rows only."""
    V = 37
    lut = make_lut(V, 2, 3, 8, torch.float32)
    t = tables(lut if fmt is None else quantize(lut, fmt), placement)
    ids = torch.tensor([5, 9, 5, 5, 30, 9])
    want = V if path == "zero_copy" else 3
    assert gathered_table_sizes(lambda: t.gather(ids, path=path)) == [want]
    assert gathered_table_sizes(lambda: t.gather_combine(ids, torch.rand(6, 3), 1, path=path)) == [want]


@pytest.mark.parametrize("placement", ["host", "disk"])
@pytest.mark.parametrize("fmt", [None, "nf4"])
def test_open_three_d_file(tmp_path, placement, fmt):
    """A [V, E, D] file (one layer; as another tool may write it, data not page-aligned) opens as [V, 1, E, D]."""
    st = pytest.importorskip("safetensors.torch")
    lut3 = make_lut(13, 1, 4, 8, torch.bfloat16)[:, 0]
    q = None if fmt is None else quantize(lut3, fmt, 4)
    path = str(tmp_path / "three_d.safetensors")
    st.save_file({"lut": lut3 if q is None else q.data}, path, metadata=None if q is None else q.metadata())
    want = lut3 if q is None else dequantize(q)
    with LookupTable.open(path, placement, device="cpu") as t:
        assert t.shape == (13, 1, 4, 8) and t.dtype == torch.bfloat16 and t.format == fmt
        ids = random_ids(13, (9,))
        assert torch.equal(t.gather(ids)[:, 0], want[ids]) and torch.equal(t.gather(ids, layer=0), want[ids])
        w = torch.rand(9, 4)
        ref = (want.double()[ids] * w.double()[..., None]).sum(-2)
        torch.testing.assert_close(t.gather_combine(ids, w, 0).double(), ref, **TOLERANCES[torch.bfloat16])


def test_argument_errors(tables):
    lut = make_lut(5, 2, 1, 4, torch.float32)
    t = tables(lut, "host")
    with pytest.raises(ValueError, match="placement"):
        LookupTable.from_tensor(lut, "vram")
    with pytest.raises(ValueError, match="lut must be"):
        LookupTable.from_tensor(lut[0, 0], "host")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        LookupTable.from_tensor(lut.double(), "host")
    with pytest.raises(ValueError, match="path must be"):
        t.gather(torch.tensor([1]), path="staged")
    with pytest.raises(ValueError, match="ids must be int32 or int64"):
        t.gather(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="layer must be"):
        t.gather(torch.tensor([1]), layer=2)
    with pytest.raises(ValueError, match="layer is required"):
        t.gather_combine(torch.tensor([1]), torch.rand(1, 1), None)
    with pytest.raises(ValueError, match="weights must have shape"):
        t.gather_combine(torch.tensor([1]), torch.rand(1, 3), 0)
    with pytest.raises(ValueError, match="placement='device' needs a CUDA device, got device=cpu"):
        LookupTable.from_tensor(lut, "device", device="cpu")
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        t.gather(torch.tensor([1]))
    assert "closed" in repr(t)


def test_repr_and_stats(tables):
    t = tables(make_lut(8, 2, 4, 16, torch.bfloat16), "host")
    r = repr(t)
    assert "placement='host'" in r and "V=8, L=2, E=4, D=16" in r and "bfloat16" in r and "2 KiB" in r
    assert t.row_bytes == 2 * 4 * 16 * 2  # L * E * D * sizeof(bf16): the unit every byte count below uses
    t.gather(torch.tensor([1, 1, 2]), path="dma")
    d = t.stats.as_dict()
    assert d["rows_requested"] == 3 and d["unique_rows"] == 2 and d["last_path"] == "dma"
    assert d["bytes_read"]["host"] == 2 * t.row_bytes and set(d["seconds"]) == {"read", "gather"}
    t.reset_stats()
    assert t.stats.calls == 0 and t.stats.last_path is None


# ------------------------------------------------------------------ files ------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("placement", ["host", "disk"])
def test_save_open_round_trip(tmp_path, dtype, placement):
    lut = make_lut(17, 3, 2, 6, dtype)
    path = tmp_path / "t.safetensors"
    with LookupTable.from_tensor(lut, "host", device="cpu") as t:
        t.save(path)
    with LookupTable.open(path, placement, device="cpu") as t:
        assert t.placement == placement and t.shape == (17, 3, 2, 6) and t.dtype == dtype
        assert t.metadata == {"format": "mole_kernels.lut", "format_version": "1", "vocab": "17",  # float: v1
                              "layers": "3", "experts": "2", "hidden": "6", "dtype": str(dtype)[6:]}
        assert torch.equal(t.read(), lut)
        ids = random_ids(17, (10,))
        assert torch.equal(t.gather(ids), lut[ids])
        t.save(tmp_path / "again.safetensors")  # a disk table saves from its file
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    assert os.path.getsize(path) == 4096 + lut.numel() * lut.element_size()  # data page-aligned, exact size


def test_safetensors_interop(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    lut = make_lut(9, 2, 3, 4, torch.bfloat16)
    ours = tmp_path / "ours.safetensors"
    LookupTable.from_tensor(lut, "disk", device="cpu", path=str(ours)).close()
    assert torch.equal(st.load_file(str(ours))["lut"], lut)
    theirs = tmp_path / "theirs.safetensors"
    st.save_file({"other": torch.zeros(3), "lut": lut}, str(theirs))
    with LookupTable.open(theirs, device="cpu") as t:
        assert torch.equal(t.gather(torch.tensor([8, 0, 8])), lut[[8, 0, 8]])


def _write(path, header, data: bytes, header_len=None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def _header(shape=(4, 2, 3, 5), dtype="F32", nbytes=None, **meta):
    n = nbytes if nbytes is not None else 4 * 2 * 3 * 5 * 4
    return {"__metadata__": {k: str(v) for k, v in meta.items()},
            "lut": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, n]}}


CORRUPT = {
    "too short": (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
    "header length": (lambda p: _write(p, _header(), b"", header_len=1 << 40), "header length"),
    "not json": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff{]x" + bytes(480)), "not valid JSON"),
    "not an object": (lambda p: _write(p, [1, 2], b""), "not a JSON object"),
    "no lut": (lambda p: _write(p, {"x": _header()["lut"]}, bytes(480)), "no tensor named 'lut'"),
    "dtype": (lambda p: _write(p, _header(dtype="I64"), bytes(480)), "I64"),  # (its size is wrong too)
    "rank": (lambda p: _write(p, _header(shape=(4, 30), nbytes=480), bytes(480)), r"\[V, L, E, D\]"),
    "offsets": (lambda p: _write(p, _header(nbytes=400), bytes(480)), "needs 480"),
    "truncated": (lambda p: _write(p, _header(), bytes(479)), "truncated"),
    "metadata shape": (lambda p: _write(p, _header(layers=3), bytes(480)), "metadata says layers=3"),
    "metadata dtype": (lambda p: _write(p, _header(dtype="F16", nbytes=240, dtype_="x"), bytes(240)), None),
    "future version": (lambda p: _write(p, _header(format_version=99), bytes(480)), "format_version 99"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
@pytest.mark.parametrize("placement", ["disk", "host"])
def test_corrupt_files_fail_at_open(tmp_path, case, placement):
    make, msg = CORRUPT[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    if msg is None:  # an unknown metadata key is not an error
        LookupTable.open(path, placement, device="cpu").close()
        return
    before = host_allocations()
    with pytest.raises(ValueError, match=msg):
        LookupTable.open(path, placement, device="cpu")
    assert host_allocations() == before


def test_metadata_dtype_mismatch(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = _header(dtype="F32")
    header["__metadata__"]["dtype"] = "bfloat16"
    _write(path, header, bytes(480))
    with pytest.raises(ValueError, match="metadata says dtype=bfloat16"):
        LookupTable.open(path, device="cpu")


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot open"):
        LookupTable.open(tmp_path / "nope.safetensors", device="cpu")


def test_disk_file_larger_than_ram_is_not_read(tmp_path):
    """A 64 GiB sparse file (more than this machine's RAM): open + gather touch only the rows asked for."""
    V, L, E, D = 1 << 20, 8, 4, 512  # 32 KiB bf16 rows, 32 GiB of table... doubled below
    V *= 2
    path = tmp_path / "huge.safetensors"
    from mole_kernels.table.file_format import _header_bytes, _metadata

    head = _header_bytes((V, L, E, D), torch.bfloat16, _metadata((V, L, E, D), torch.bfloat16))
    row = make_lut(1, L, E, D, torch.bfloat16)
    with open(path, "wb") as f:
        f.write(head)
        f.seek(len(head) + (V - 1) * row.numel() * 2)
        f.write(row.view(torch.uint8).numpy().tobytes())  # the last row; everything else is a hole
    try:
        with LookupTable.open(path, "disk", device="cpu", staging_bytes=1 << 20) as t:
            assert t.nbytes == 64 << 30
            got = t.gather(torch.tensor([V - 1, 5, V - 1]))
            assert torch.equal(got[0], row[0]) and torch.equal(got[2], row[0])
            assert torch.count_nonzero(got[1]) == 0
    finally:
        path.unlink()


def test_disk_chunking_through_tiny_staging(tables):
    V, L, E, D = 64, 3, 2, 8
    lut = make_lut(V, L, E, D, torch.float16)
    row = L * E * D * 2
    t = tables(lut, "disk", staging_bytes=2 * row + 7)  # each half holds exactly one row
    ids = torch.randperm(V)[:40].repeat(2)
    assert torch.equal(t.gather(ids), lut[ids])
    assert t.stats.unique_rows == 40
    # one layer's piece is smaller: 3 pieces per half
    assert torch.equal(t.gather(ids, layer=2), lut[ids, 2])
    with pytest.raises(ValueError, match="staging_bytes"):  # a half cannot hold one token's rows
        tables(lut, "disk", staging_bytes=row)


# ------------------------------------------------------------------ memory -----------------


def test_release_on_close_and_collection():
    gc.collect()  # tables from earlier tests, still in reference cycles, must not be freed mid-test
    base = host_allocations()
    lut = make_lut(40, 2, 3, 100, torch.bfloat16)  # 48000 B -> 12 pages (exact size, page-rounded)
    t = LookupTable.from_tensor(lut, "host", device="cpu")
    now = host_allocations()
    assert now["count"] == base["count"] + 1 and now["bytes"] - base["bytes"] == 49152
    t.close()
    assert host_allocations() == base
    t = LookupTable.from_tensor(lut, "host", device="cpu")
    del t
    gc.collect()
    assert host_allocations() == base
    # a view taken before close keeps its memory valid until it is dropped
    t = LookupTable.from_tensor(lut, "host", device="cpu")
    view = t.tensor
    t.close()
    assert host_allocations()["count"] == base["count"] + 1 and torch.equal(view, lut)
    del view
    assert host_allocations() == base
    # disk tier on a CPU: rows are read straight into the result, no staging is held
    t = LookupTable.from_tensor(lut, "disk", device="cpu", staging_bytes=1 << 16)
    t.gather(torch.tensor([3]))
    assert host_allocations() == base
    t.close()
    assert host_allocations() == base


def test_allocation_failure_is_clear():
    with pytest.raises(RuntimeError, match=r"could not allocate .* bytes.*placement='disk'"):
        torch.classes.mole_kernels.TableStore("host", "", 0, 1 << 62, False)


def test_store_rejects_bad_rows():
    s = torch.classes.mole_kernels.TableStore("host", "", 0, 64, False)
    dst = torch.empty(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="ids contains 4"):
        s.copy_rows(torch.tensor([0, 4]), 16, 0, 16, dst)
    with pytest.raises(ValueError, match="segment"):
        s.copy_rows(torch.tensor([0]), 16, 8, 16, dst)
    with pytest.raises(ValueError, match="at least 48 bytes"):
        s.copy_rows(torch.tensor([0, 1, 2]), 16, 0, 16, dst[:40])


# ------------------------------------------------------------------ prefetcher -------------


@pytest.mark.parametrize("placement,path", TIER_PATHS)
def test_prefetcher_double_buffer(tables, placement, path):
    V, L, E, D = 29, 3, 2, 10
    lut = make_lut(V, L, E, D, torch.bfloat16)
    t = tables(lut, placement)
    pf = t.prefetcher(8)
    a, b, c = random_ids(V, (8,)), random_ids(V, (5,)), random_ids(V, (3,))
    ha = pf.start(a, path=path)
    hb = pf.start(b, path=path)  # two in flight: b does not overwrite a
    for l in range(L):
        assert torch.equal(ha.layer(l).double(), ref_rows(lut, a, l))
        assert torch.equal(hb.layer(l).double(), ref_rows(lut, b, l))
        assert torch.equal(pf.layer(l), hb.layer(l))
    view = hb.layer(1)  # a view of the token-major buffer [max_tokens, L, E, D]
    assert view.shape == (5, E, D) and view.stride() == (L * E * D, D, 1)
    pf.start(c, path=path)  # reuses a's buffer
    with pytest.raises(RuntimeError, match="overwritten"):
        ha.layer(0)
    assert torch.equal(hb.layer(2).double(), ref_rows(lut, b, 2))
    assert torch.equal(pf.layer(0).double(), ref_rows(lut, c, 0))
    assert pf.start(torch.empty(0, dtype=torch.int64), path=path).layer(0).shape == (0, E, D)


def test_prefetcher_errors_and_faults(tables):
    V = 10
    lut = make_lut(V, 2, 1, 4, torch.float32)
    t = tables(lut, "host")
    pf = t.prefetcher(4)
    with pytest.raises(RuntimeError, match="start"):
        pf.layer(0)
    with pytest.raises(ValueError, match="max_tokens=4"):
        pf.start(torch.arange(5))
    with pytest.raises(ValueError, match="ids contains 10"):
        pf.start(torch.tensor([1, 10]))
    pf.start(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="l must be"):
        pf.layer(2)
    with pytest.raises(ValueError, match="max_tokens"):
        t.prefetcher(0)
    lax = t.prefetcher(4, strict=False)  # graph-capturable mode: counts instead of raising
    h = lax.start(torch.tensor([3, -1, 10, 3]))
    assert lax.faults == 2
    assert torch.equal(h.layer(1)[0], lut[3, 1]) and torch.count_nonzero(h.layer(1)[1:3]) == 0


# ------------------------------------------------------------------ CUDA -------------------


@requires_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_every_path(tmp_path, dtype):
    V, L, E, D = 301, 3, 4, 72
    lut = make_lut(V, L, E, D, dtype)
    ids = random_ids(V, (50,))
    w = torch.rand(50, E)
    cases = [("device", "device"), ("host", "zero_copy"), ("host", "dma"), ("disk", "staged")]
    for placement, path in cases:
        t = LookupTable.from_tensor(lut, placement, device="cuda", staging_bytes=3 * L * E * D * lut.element_size())
        if placement == "host":
            assert t.pinned and t.tensor.is_pinned()
        for src in (ids, ids.cuda()):
            got = t.gather(src, path=path)
            assert got.is_cuda and torch.equal(got.cpu().double(), ref_rows(lut, ids)), (placement, path)
            got = t.gather(src, layer=2, path=path)
            assert torch.equal(got.cpu().double(), ref_rows(lut, ids, 2)), (placement, path)
            c = t.gather_combine(src, w.cuda(), 1, path=path)
            torch.testing.assert_close(c.cpu().double(), ref_combine(lut, ids, w, 1), **TOLERANCES[dtype])
        with pytest.raises(ValueError, match="ids contains"):
            t.gather(torch.tensor([V]), path=path)
            torch.cuda.synchronize()
        if path in ("dma", "staged"):
            assert t.stats.bytes_h2d > 0 and t.stats.unique_rows < t.stats.rows_requested
        t.close()


@requires_cuda
def test_cuda_auto_paths():
    lut = make_lut(100, 2, 2, 64, torch.float16)
    t = LookupTable.from_tensor(lut, "host", device="cuda")
    t.gather(torch.randint(0, 100, (500,), device="cuda"))
    assert t.stats.last_path == "zero_copy"  # ids on the GPU: no synchronisation
    t.gather(torch.randint(0, 100, (500,)))
    assert t.stats.last_path == "dma"  # a large batch on the host: dedupe + DMA
    t.close()


@requires_cuda
@pytest.mark.parametrize("placement", ["device", "host", "disk"])
def test_cuda_prefetcher_side_stream(placement):
    V, L, E, D = 257, 4, 4, 128
    lut = make_lut(V, L, E, D, torch.bfloat16)
    t = LookupTable.from_tensor(lut, placement, device="cuda")
    pf = t.prefetcher(64)
    a = random_ids(V, (64,)).cuda()
    b = random_ids(V, (31,)).cuda()
    ha, hb = pf.start(a), pf.start(b)
    for l in range(L):
        assert torch.equal(ha.layer(l).cpu(), lut[a.cpu(), l])
        assert torch.equal(hb.layer(l).cpu(), lut[b.cpu(), l])
    t.close()


# ~0.2 s of a spin kernel at 1.5-2 GHz: far longer than layer 0's gather and a host round trip.
SPIN_CYCLES = 400_000_000


@requires_cuda
@pytest.mark.parametrize("placement", ["device", "host"])
def test_cuda_prefetcher_layer_waits_only_for_its_own_rows(placement, monkeypatch):
    """Layer 0 is readable while the prefetch stream is still busy before layer L-1, and every layer's
    rows are right. A spin kernel is queued on the prefetch stream before the gather of the last
    layer group (layers [4, 6) of L = 6: the Prefetcher fills groups [0, 1), [1, 2), [2, 4), [4, 6)
    with one gather each, `layer=slice(a, b)`; adapt `delayed` if it issues its gathers another
    way): a layer(l) that waited for all layers would stall until the spin ends, one that waited
    for nothing would read the buffer's previous rows."""
    import mole_kernels.table.prefetch as prefetch_mod

    V, L, E, D = 97, 6, 4, 256
    lut = make_lut(V, L, E, D, torch.bfloat16)
    t = LookupTable.from_tensor(lut, placement, device="cuda")
    pf = t.prefetcher(16)
    old, other, new = torch.arange(0, 16), torch.arange(16, 32), torch.arange(32, 48)
    pf.start(old.cuda())
    pf.start(other.cuda())  # `new` goes into `old`'s buffer: reading it too early shows old's rows
    torch.cuda.synchronize()
    real, last_done, fired = prefetch_mod.lut_gather, torch.cuda.Event(), []

    assert prefetch_mod.layer_groups(L)[-1] == (4, L) and prefetch_mod.layer_groups(L)[0] == (0, 1)

    def delayed(*args, **kwargs):
        layers = kwargs.get("layer")
        last = isinstance(layers, slice) and layers.stop == L
        if last:
            torch.cuda._sleep(SPIN_CYCLES)  # on the current stream: the prefetch stream
            fired.append(torch.cuda.current_stream())
        out = real(*args, **kwargs)
        if last:
            last_done.record()
        return out

    monkeypatch.setattr(prefetch_mod, "lut_gather", delayed)
    handle = pf.start(new.cuda())
    assert len(fired) == 1 and fired[0] != torch.cuda.current_stream(), "the last layer was not gathered on a side stream"
    first = pf.layer(0).clone()
    reached = torch.cuda.Event()
    reached.record()
    reached.synchronize()  # the current stream got past layer 0's rows ...
    assert not last_done.query(), "layer(0) waited for the last layer's rows"  # ... while layer L-1 is pending
    assert torch.equal(first.cpu(), lut[new, 0])
    for l in range(L):
        assert torch.equal(handle.layer(l).cpu(), lut[new, l]), f"layer {l} read before its rows were written"
    t.close()


@requires_cuda
def test_cuda_host_table_zero_copy_moves_only_the_rows_asked_for():
    """Zero-copy reads a host table in place: device memory does not grow by the table (256 MiB),
    and the bytes reported as moved are the rows read."""
    V, L, E, D = 8192, 4, 4, 1024
    lut = torch.empty(V, L, E, D, dtype=torch.bfloat16)
    ids = torch.tensor([V - 1, 7, V // 3, 7, 12])
    lut[ids] = make_lut(5, L, E, D, torch.bfloat16)  # only the rows read need values
    t = LookupTable.from_tensor(lut, "host", device="cuda")
    assert t.pinned and t.nbytes == lut.numel() * 2
    w = torch.rand(5, E, device="cuda")
    t.gather(ids[:1].cuda(), path="zero_copy")  # loads the kernels' code before the measurement
    t.reset_stats()
    torch.cuda.synchronize()
    free0, allocated0 = torch.cuda.mem_get_info()[0], torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rows = t.gather(ids.cuda(), path="zero_copy")
    combined = t.gather_combine(ids.cuda(), w, 2, path="zero_copy")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - allocated0 < t.nbytes // 64  # the results: 160 KiB + 10 KiB
    assert free0 - torch.cuda.mem_get_info()[0] < t.nbytes // 4
    assert torch.equal(rows.cpu(), lut[ids])
    torch.testing.assert_close(combined.cpu().double(), ref_combine(lut, ids, w.cpu(), 2), **TOLERANCES[torch.bfloat16])
    row = L * E * D * 2
    assert t.stats.bytes_h2d == 5 * row + 5 * row // L  # every id's rows (no dedupe on this path), then one layer's
    assert t.stats.bytes_read["host"] == t.stats.bytes_h2d
    t.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (runs on cuda:1)")
@pytest.mark.parametrize("placement", ["device", "host", "disk"])
def test_cuda_second_device(placement):
    """A table for cuda:1 while cuda:0 is current: every path and the prefetcher deliver on cuda:1."""
    dev = torch.device("cuda", 1)
    V, L, E, D = 61, 3, 4, 40
    lut = make_lut(V, L, E, D, torch.float16)
    t = LookupTable.from_tensor(lut, placement, device=dev)
    ids = random_ids(V, (12,))
    w = torch.rand(12, E)
    for path in t.paths():
        for src in (ids, ids.to(dev)):
            got = t.gather(src, path=path)
            assert got.device == dev and torch.equal(got.cpu(), lut[ids])
            c = t.gather_combine(src, w.to(dev), 1, path=path)
            assert c.device == dev
            torch.testing.assert_close(c.cpu().double(), ref_combine(lut, ids, w, 1), **TOLERANCES[torch.float16])
    h = t.prefetcher(12).start(ids.to(dev))
    for l in range(L):
        assert torch.equal(h.layer(l).cpu(), lut[ids, l])
    assert torch.cuda.current_device() == 0
    t.close()


@requires_cuda
def test_cuda_prefetcher_graph_capture():
    V, L, E, D = 128, 3, 4, 64
    lut = make_lut(V, L, E, D, torch.float16)
    t = LookupTable.from_tensor(lut, "host", device="cuda")
    pf = t.prefetcher(16, strict=False)
    ids = torch.zeros(16, dtype=torch.int64, device="cuda")
    out = torch.zeros(L, 16, E, D, dtype=torch.float16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the graph
        pf.start(ids)
        for l in range(L):
            out[l].copy_(pf.layer(l))
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pf.start(ids)
        for l in range(L):
            out[l].copy_(pf.layer(l))
    for _ in range(2):
        new = torch.randint(0, V, (16,))
        ids.copy_(new)
        g.replay()
        torch.cuda.synchronize()
        for l in range(L):
            assert torch.equal(out[l].cpu(), lut[new, l])
    assert pf.faults == 0
    t.close()


@requires_cuda
def test_cuda_pinned_release():
    base = host_allocations()
    t = LookupTable.from_tensor(make_lut(64, 2, 4, 256, torch.bfloat16), "host", device="cuda")
    assert t.pinned and host_allocations()["count"] == base["count"] + 1
    t.close()
    assert host_allocations() == base


@requires_cuda
@pytest.mark.parametrize("placement", ["device", "host", "disk"])
def test_cuda_open_every_placement(tmp_path, placement):
    lut = make_lut(33, 2, 4, 40, torch.bfloat16)
    path = tmp_path / "t.safetensors"
    LookupTable.from_tensor(lut, "host", device="cpu").save(path)
    with LookupTable.open(path, placement, device="cuda") as t:
        assert t.placement == placement and t.device.type == "cuda"
        ids = random_ids(33, (40,))
        assert torch.equal(t.gather(ids).cpu(), lut[ids])


@requires_cuda
def test_cuda_stage_rows_refused_under_graph_capture():
    """The DMA path's rows are gathered by host threads into pinned staging: a graph replay would copy
    stale staging, so capturing it is refused with a message that says so (issue 23)."""
    t = LookupTable.from_tensor(torch.randn(64, 2, 2, 8), "host", device="cuda")
    ids = torch.arange(64)
    t.gather(ids, path="dma")  # warm: staging made, kernels loaded
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError) as err:
        with torch.cuda.graph(g):
            t.gather(ids, path="dma")
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__context__
    assert any("CUDA graph" in m and "stage_rows" in m for m in chain), chain
    t.close()
