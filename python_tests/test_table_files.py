"""LookupTable against hostile files and concurrent use: never a crash, never lost data, never wrong rows.

Cases that could kill the process (a signal) run in a child process, so a crash fails the test
instead of ending the run; cases that could block run with a timeout.
"""
import os
import stat
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from mole_kernels import LookupTable, quantize

V, L, E, D = 64, 3, 2, 16


def make_lut(dtype=torch.float32):
    return torch.randn(V, L, E, D).to(dtype)


def run_child(code: str, timeout: float = 120):
    """Runs python code in a fresh process (from the tests folder, importing the installed package)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(os.path.abspath(__file__)))
    return proc.returncode, proc.stdout + proc.stderr


# ------------------------------------------------------------------ files changed after open --------


def test_file_changed_after_open_is_a_clear_error(tmp_path):
    # One child for the three ways another process can change the file under an open table.
    code = f"""
        import os, time, torch
        from mole_kernels import LookupTable
        lut = torch.randn({V}, {L}, {E}, {D})
        for change in ("truncate", "rewrite", "extend"):
            path = os.path.join({str(tmp_path)!r}, change + ".safetensors")
            LookupTable.from_tensor(lut, "host", device="cpu").save(path)
            t = LookupTable.open(path, "disk", device="cpu")
            assert torch.equal(t.gather(torch.tensor([{V - 1}])), lut[[{V - 1}]])
            time.sleep(0.01)  # a later modification time, even on coarse clocks
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                if change == "truncate":
                    f.truncate(size // 2)
                elif change == "rewrite":
                    f.seek(size - 64); f.write(os.urandom(64))
                else:
                    f.seek(0, 2); f.write(b"x" * 100)
            try:
                t.gather(torch.tensor([{V - 1}, 0]))
            except RuntimeError as e:
                print("ERROR:", change, e)
    """
    rc, out = run_child(code)
    assert rc == 0, out  # not a signal
    for change in ("truncate", "rewrite", "extend"):
        assert f"ERROR: {change} LookupTable: " in out and f"{change}.safetensors changed after it was opened" in out, out


def test_unlinked_or_renamed_file_keeps_serving_what_was_opened(tmp_path):
    lut = make_lut()
    path = tmp_path / "t.safetensors"
    LookupTable.from_tensor(lut, "host", device="cpu").save(path)
    t = LookupTable.open(path, "disk", device="cpu")
    os.rename(path, tmp_path / "moved.safetensors")
    assert torch.equal(t.gather(torch.tensor([3, 60])), lut[[3, 60]])
    os.unlink(tmp_path / "moved.safetensors")
    assert torch.equal(t.gather(torch.tensor([5])), lut[[5]])
    # replaced by a new file under the same name (what save() does): the open table keeps its snapshot
    LookupTable.from_tensor(make_lut(), "host", device="cpu").save(path)
    assert torch.equal(t.gather(torch.tensor([7])), lut[[7]])


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = f"""
        from mole_kernels import LookupTable
        for p in ({str(fifo)!r}, {str(tmp_path)!r}, "/dev/zero"):
            try:
                LookupTable.open(p, "disk", device="cpu")
            except ValueError as e:
                print("ERROR:", e)
    """
    rc, out = run_child(code, timeout=60)  # a blocking open of the FIFO would time out here
    assert rc == 0, out
    assert out.count("ERROR:") == 3 and out.count("not a regular file") == 3, out


def test_store_size_arithmetic_cannot_overflow():
    code = """
        import torch, mole_kernels
        S = torch.classes.mole_kernels.TableStore
        for args in [("file", "/etc/hostname", 2**62, 2**62, False), ("file", "/etc/hostname", 2**63 - 1, 1, False),
                     ("file", "/etc/hostname", 0, -1, False), ("host", "", 0, 2**63 - 1, False)]:
            try:
                S(*args)
            except (ValueError, RuntimeError) as e:
                print("ERROR:", str(e).splitlines()[0])
        s = S("host", "", 0, 64, False)
        dst = torch.empty(64, dtype=torch.uint8)
        for args in [(16, 2**62, 2**62), (16, 8, 2**63 - 1), (2**62, 0, 16)]:
            try:
                s.copy_rows(torch.tensor([0]), *args, dst)
            except (ValueError, RuntimeError) as e:
                print("ERROR:", str(e).splitlines()[0])
    """
    rc, out = run_child(code)
    assert rc == 0, out
    assert out.count("ERROR:") == 7, out


def test_disk_table_exposes_no_tensor_to_write_through():
    t = LookupTable.from_tensor(make_lut(), "disk", device="cpu")
    with pytest.raises(ValueError, match="disk table's rows stay in its file"):
        t.tensor
    # read() is a private copy: writing to it leaves the table alone
    rows = t.read(2, 4)
    rows.fill_(7)
    assert not torch.equal(t.gather(torch.tensor([2])), rows[:1])


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_read_every_tier_and_argument_checks(placement):
    lut = make_lut(torch.bfloat16)
    t = LookupTable.from_tensor(lut, placement, device="cpu")
    assert torch.equal(t.read(), lut) and torch.equal(t.read(5, 9), lut[5:9]) and t.read(3, 3).shape[0] == 0
    for bad in [(-1, 2), (4, 2), (0, V + 1), (True, 2)]:
        with pytest.raises(ValueError, match="LookupTable.read"):
            t.read(*bad)
    q = LookupTable.from_tensor(lut, placement, device="cpu", format="nf4", block_size=8)
    assert torch.equal(q.read(1, 6).data, quantize(lut, "nf4", 8).data[1:6])


# ------------------------------------------------------------------ concurrent use ------------------


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_one_table_from_four_threads(placement):
    lut = make_lut()
    t = LookupTable.from_tensor(lut, placement, device="cpu")
    errors = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(40):
            ids = torch.randint(0, V, (int(torch.randint(1, 50, (1,), generator=g)),), generator=g)
            path = "auto" if placement == "disk" else ("dma" if seed % 2 else "zero_copy")
            if not torch.equal(t.gather(ids, path=path), lut[ids]):
                errors.append(seed)
            w = torch.rand(ids.numel(), E, generator=g)
            want = (w[..., None].double() * lut[ids, 1].double()).sum(-2)
            if not torch.allclose(t.gather_combine(ids, w, 1).double(), want, atol=1e-5):
                errors.append(seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert t.stats.calls == 4 * 40 * 2


# ------------------------------------------------------------------ saving --------------------------


def test_save_is_atomic_and_never_follows_a_symlink(tmp_path):
    lut = make_lut()
    t = LookupTable.from_tensor(lut, "host", device="cpu")
    target = tmp_path / "lut.safetensors"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    decoy = tmp_path / "lut.safetensors.tmp"  # the old fixed temporary name: a user's file is left alone
    decoy.write_bytes(b"mine")
    os.symlink(victim, target)  # a planted symlink: save replaces the link, never writes its target
    t.save(target)
    assert victim.read_bytes() == b"keep me" and decoy.read_bytes() == b"mine"
    assert not target.is_symlink() and torch.equal(LookupTable.open(target, "host", device="cpu").read(), lut)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lut.safetensors", "lut.safetensors.tmp", "victim"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask


def test_save_over_the_open_file_and_a_failed_save_leave_no_trace(tmp_path):
    lut = make_lut()
    path = tmp_path / "t.safetensors"
    LookupTable.from_tensor(lut, "host", device="cpu").save(path)
    t = LookupTable.open(path, "disk", device="cpu")
    t.save(path)  # reads from the file it replaces: the open descriptor keeps the old bytes
    assert torch.equal(LookupTable.open(path, "host", device="cpu").read(), lut)
    with pytest.raises(OSError):
        t.save(tmp_path / "missing-folder" / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_concurrent_saves_to_one_path_give_a_whole_file(tmp_path):
    # Writers racing on one path (threads here; processes race the same way: each writes its own
    # unique temporary file and renames it): the file is always one writer's whole table.
    path = tmp_path / "t.safetensors"
    tables = [LookupTable.from_tensor(torch.full((V, L, E, D), float(k)), "host", device="cpu") for k in range(3)]

    errors = []

    def work(t):
        try:
            for _ in range(15):
                t.save(path)
        except BaseException as e:  # a thread's exception is otherwise only a warning
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in tables]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    got = LookupTable.open(path, "host", device="cpu").read()
    assert (got == got.view(-1)[0]).all() and got.view(-1)[0].item() in (0.0, 1.0, 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": "1114", "data_offsets": [0, 16]},      # a string where a list is meant
    {"dtype": "F32", "shape": [1, 1, 1, 4.5], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [True, 1, 1, 4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [1, 1, 1, 4], "data_offsets": ["0", 16]},
    {"dtype": 7, "shape": [1, 1, 1, 4], "data_offsets": [0, 16]},
    ["not", "an", "object"],
])
def test_header_fields_of_the_wrong_json_type_are_refused(tmp_path, entry):
    import json
    import struct

    raw = json.dumps({"lut": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(ValueError, match=r"bad\.safetensors: tensor 'lut' entry .* needs dtype"):
        LookupTable.open(path, "disk", device="cpu")
