"""Corpus loading and the deterministic batch sampler (single process)."""

from __future__ import annotations

import dataclasses
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_dist.config import DataConfig
from moe_dist.data import Batch, TokenSplits, global_batch, load_tokens, rank_batch

SEQ = 16


@pytest.fixture(scope="module")
def stdlib() -> TokenSplits:
    return load_tokens(DataConfig(name="stdlib"), vocab_size=256, seq_len=128)


def xy(batch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch.inputs, batch.targets


def as_bytes(stream) -> bytes:
    return stream.read(0, stream.num_tokens).astype(np.uint8).tobytes()


def arange_stream(n: int = 1000) -> torch.Tensor:
    # token i == i, so each row's start offset can be read off its first input
    return torch.arange(n, dtype=torch.int32)


# ---------------------------------------------------------------- sampler


def test_same_seed_and_step_give_same_batch():
    tokens = torch.randint(0, 256, (5000,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    x1, y1 = xy(global_batch(tokens, seed=7, step=3, batch_size=8, seq_len=SEQ))
    x2, y2 = xy(global_batch(tokens, seed=7, step=3, batch_size=8, seq_len=SEQ))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = xy(global_batch(tokens, seed=7, step=4, batch_size=8, seq_len=SEQ))
    x4, _ = xy(global_batch(tokens, seed=8, step=3, batch_size=8, seq_len=SEQ))
    assert not torch.equal(x1, x3)
    assert not torch.equal(x1, x4)


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    global_batch(arange_stream(), seed=1, step=1, batch_size=4, seq_len=SEQ)
    assert torch.equal(torch.rand(3), expected)


def test_targets_are_inputs_shifted_by_one():
    stream = torch.randint(0, 50_000, (3000,), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    x, y = xy(global_batch(stream, seed=0, step=5, batch_size=32, seq_len=SEQ))
    assert x.shape == y.shape == (32, SEQ)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Every row is a window of the stream: find it by its offset and compare both tensors to it.
    idx = arange_stream(3000)
    xi, _ = xy(global_batch(idx, seed=0, step=5, batch_size=32, seq_len=SEQ))
    for row in range(32):
        o = int(xi[row, 0])
        assert torch.equal(x[row], stream[o : o + SEQ].long())
        assert torch.equal(y[row], stream[o + 1 : o + SEQ + 1].long())


def test_offsets_cover_the_whole_valid_range():
    n = SEQ + 3  # valid starts: 0, 1, 2
    x, y = xy(global_batch(arange_stream(n), seed=0, step=0, batch_size=200, seq_len=SEQ))
    assert set(x[:, 0].tolist()) == {0, 1, 2}
    assert int(y.max()) == n - 1


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_concatenate_to_global_batch(world_size):
    tokens = arange_stream(10_000)
    gx, gy = xy(global_batch(tokens, seed=11, step=42, batch_size=8, seq_len=SEQ))
    parts = [
        xy(
            rank_batch(
                tokens, seed=11, step=42, global_batch_size=8, seq_len=SEQ, rank=r, world_size=world_size
            )
        )
        for r in range(world_size)
    ]
    assert all(p[0].shape == (8 // world_size, SEQ) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), gx)
    assert torch.equal(torch.cat([p[1] for p in parts]), gy)


def test_batch_rows_moves_every_tensor_field():
    """What the trainer prefetches to the device (pinned copies on CUDA) is the whole micro-batch: a tensor
    field left on the host would fail on a GPU only. ``meta`` stands in for the device."""
    rows = slice(1, 3)
    batch = Batch(
        inputs=torch.arange(20).view(4, 5),
        targets=torch.arange(20).view(4, 5) + 1,
        doc_ids=torch.arange(20).view(4, 5) // 3,
        global_targets=20,
    )
    tensor_fields = [
        f.name for f in dataclasses.fields(Batch) if isinstance(getattr(batch, f.name), torch.Tensor)
    ]
    assert tensor_fields == ["inputs", "targets", "doc_ids"]
    on_device = batch.rows(rows, torch.device("meta"))
    for name in tensor_fields:
        assert getattr(on_device, name).device.type == "meta", name
        assert getattr(on_device, name).shape == (2, 5), name
    on_host = batch.rows(rows)
    for name in tensor_fields:
        assert torch.equal(getattr(on_host, name), getattr(batch, name)[rows]), name
    assert on_device.global_targets == on_host.global_targets == 20


def test_rank_batch_rejects_uneven_split():
    with pytest.raises(ValueError, match="global_batch_size=6"):
        rank_batch(arange_stream(), seed=0, step=0, global_batch_size=6, seq_len=SEQ, rank=0, world_size=4)


def test_too_short_stream_rejected():
    with pytest.raises(ValueError, match="seq_len=16"):
        global_batch(arange_stream(SEQ), seed=0, step=0, batch_size=1, seq_len=SEQ)


# ---------------------------------------------------------------- stdlib


def test_stdlib_loads_bytes_and_size(stdlib):
    assert all(seg.tokens.dtype == np.uint8 for seg in stdlib.train.segments + stdlib.val.segments)
    total = stdlib.train.num_tokens + stdlib.val.num_tokens
    assert 2_000_000 < total < 40_000_000
    assert 0 < stdlib.val.num_tokens < stdlib.train.num_tokens
    assert stdlib.description.startswith("stdlib: ")


def test_stdlib_contains_os_py_in_its_split(stdlib):
    os_py = (Path(sysconfig.get_paths()["stdlib"]) / "os.py").read_bytes()
    in_val = zlib.crc32(b"os.py") % 10_000 < 0.05 * 10_000
    home, other = (stdlib.val, stdlib.train) if in_val else (stdlib.train, stdlib.val)
    assert os_py in as_bytes(home)
    assert os_py not in as_bytes(other)


def test_stdlib_excludes_test_trees(stdlib):
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = root / "test" / "test_grammar.py"
    if not excluded.is_file():
        pytest.skip(f"{excluded} is not installed here")
    text = as_bytes(stdlib.train) + as_bytes(stdlib.val)
    assert excluded.read_bytes() not in text


def test_stdlib_split_is_disjoint_by_file(stdlib):
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = as_bytes(stdlib.train), as_bytes(stdlib.val)
    for rel in ("os.py", "json/decoder.py", "collections/__init__.py", "argparse.py", "typing.py"):
        body = (root / rel).read_bytes()
        assert (body in train) != (body in val), rel


def test_byte_corpus_needs_vocab_256():
    with pytest.raises(ValueError, match=r"model\.vocab_size=100"):
        load_tokens(DataConfig(name="stdlib"), vocab_size=100, seq_len=8)


def test_seq_len_larger_than_split_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    with pytest.raises(ValueError, match=r"model\.seq_len=1000"):
        load_tokens(DataConfig(name="text", path=str(tmp_path / "a.txt")), vocab_size=256, seq_len=1000)


# ---------------------------------------------------------------- text


def write_files(root: Path, n: int = 40) -> dict[str, bytes]:
    files = {}
    for i in range(n):
        rel = f"sub{i % 3}/file{i:02d}.txt"
        body = f"file {i}: " + "é" * 20 + "abc" * (10 + i)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(body, encoding="utf-8")
        files[rel] = body.encode("utf-8")
    return files


def expected_split(files: dict[str, bytes], val_fraction: float) -> tuple[bytes, bytes]:
    rels = sorted(files)
    val = [r for r in rels if zlib.crc32(r.encode()) % 10_000 < val_fraction * 10_000]
    train = [r for r in rels if r not in val]
    assert val and train  # the chosen fraction gives both with these names
    return b"\n\n".join(files[r] for r in train), b"\n\n".join(files[r] for r in val)


def test_text_from_single_file_splits_by_position(tmp_path):
    body = ("line ünïcode\n" * 200).encode()
    (tmp_path / "one.txt").write_bytes(body)
    s = load_tokens(
        DataConfig(name="text", path=str(tmp_path / "one.txt"), val_fraction=0.25), vocab_size=256, seq_len=8
    )
    n_val = len(body) // 4 + (len(body) % 4 > 0)
    assert as_bytes(s.val) == body[-n_val:]
    assert as_bytes(s.train) == body[:-n_val]


def test_text_from_directory_splits_by_file(tmp_path):
    files = write_files(tmp_path)
    s = load_tokens(DataConfig(name="text", path=str(tmp_path), val_fraction=0.3), vocab_size=256, seq_len=8)
    train, val = expected_split(files, 0.3)
    assert as_bytes(s.train) == train
    assert as_bytes(s.val) == val


def test_text_from_glob_matches_directory(tmp_path):
    files = write_files(tmp_path)
    (tmp_path / "sub0" / "skip.md").write_text("not matched")
    s = load_tokens(
        DataConfig(name="text", path=str(tmp_path / "**" / "*.txt"), val_fraction=0.3),
        vocab_size=256,
        seq_len=8,
    )
    train, val = expected_split(files, 0.3)
    assert as_bytes(s.train) == train
    assert as_bytes(s.val) == val
    assert "40 files" in s.description


def test_text_rejects_non_utf8(tmp_path):
    write_files(tmp_path, n=3)
    (tmp_path / "bad.bin").write_bytes(b"ok\xff\xfe")
    with pytest.raises(ValueError, match=r"data\.path=.*bad\.bin.*UTF-8"):
        load_tokens(DataConfig(name="text", path=str(tmp_path)), vocab_size=256, seq_len=4)


@pytest.mark.parametrize("name", ["text", "tokens"])
def test_missing_path_names_the_key(tmp_path, name):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"data\.path=.*nope"):
        load_tokens(DataConfig(name=name, path=missing), vocab_size=256, seq_len=4)


def test_empty_glob_names_the_key(tmp_path):
    pattern = str(tmp_path / "*.none")
    with pytest.raises(ValueError, match=r"data\.path=.*\*\.none.*no files match"):
        load_tokens(DataConfig(name="text", path=pattern), vocab_size=256, seq_len=4)


def test_empty_text_rejected(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data\.path=.*empty"):
        load_tokens(DataConfig(name="text", path=str(tmp_path)), vocab_size=256, seq_len=4)


# ---------------------------------------------------------------- tokens


def test_token_file_round_trip(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50_000, size=10_000).astype("<u2")
    ids[123] = 49_999
    path = tmp_path / "ids.bin"
    ids.tofile(path)
    s = load_tokens(
        DataConfig(name="tokens", path=str(path), val_fraction=0.1), vocab_size=50_000, seq_len=32
    )
    assert s.train.num_tokens == 9_000 and s.val.num_tokens == 1_000
    assert np.array_equal(s.train.read(0, 9_000), ids[:9_000])
    assert np.array_equal(s.val.read(0, 1_000), ids[9_000:])
    assert "max id 49999" in s.description
    x, y = xy(global_batch(s.train, seed=3, step=1, batch_size=4, seq_len=32))
    assert x.dtype == torch.int64
    assert int(x.max()) < 50_000
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_token_id_out_of_vocab_rejected(tmp_path):
    path = tmp_path / "ids.bin"
    np.array([1, 2, 3, 300, 4] * 100, dtype="<u2").tofile(path)
    with pytest.raises(ValueError) as err:
        load_tokens(DataConfig(name="tokens", path=str(path)), vocab_size=256, seq_len=8)
    msg = str(err.value)
    assert "data.path" in msg and "300" in msg and "model.vocab_size=256" in msg


def test_token_file_odd_size_rejected(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"data\.path=.*size 3 bytes is odd"):
        load_tokens(DataConfig(name="tokens", path=str(path)), vocab_size=256, seq_len=1)
