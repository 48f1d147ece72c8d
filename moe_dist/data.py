"""Token corpora and the deterministic batch sampler.

Three sources (``data.name``):
  stdlib  the ``*.py`` sources of the running Python's standard library, byte-level (vocab 256)
  text    UTF-8 files from ``data.path`` (a file, a directory or a glob), byte-level (vocab 256)
  tokens  a flat little-endian uint16 token-id file at ``data.path``, memory-mapped

Byte-level corpora join their files with ``b"\\n\\n"`` in sorted relative-path order and hold out
whole files: a file is validation when ``crc32(relative_path) % 10_000 < val_fraction * 10_000``,
so the split does not move when files are added elsewhere. A single file (and the token file) is
split by position instead: its last ``val_fraction`` is validation.

The batch of a step is a pure function of ``(seed, step)``: B start offsets drawn from a private
``torch.Generator``, so every world size sees the same global batch and each rank gathers only
its contiguous slice of rows.
"""

from __future__ import annotations

import glob
import math
import os
import sysconfig
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_dist.config import DATASETS, DataConfig

BYTE_VOCAB = 256
FILE_SEPARATOR = b"\n\n"
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
_SPLIT_BUCKETS = 10_000
_SEED_MULTIPLIER = 1_000_003


@dataclass
class TokenSplits:
    train: torch.Tensor  # 1-D integer token stream used for training
    val: torch.Tensor  # 1-D held-out token stream
    description: str  # one line saying what was loaded and from where


def load_tokens(cfg: DataConfig, *, vocab_size: int, seq_len: int) -> TokenSplits:
    """Loads the corpus named by ``cfg`` and splits it; raises ValueError naming the config key."""
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name={cfg.name!r}: must be one of {DATASETS}")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"data.val_fraction={cfg.val_fraction!r}: must be in (0, 1)")
    if cfg.name in ("text", "tokens") and not cfg.path:
        raise ValueError(f"data.path={cfg.path!r}: is required for data.name={cfg.name}")

    if cfg.name == "tokens":
        splits = _load_token_file(str(cfg.path), cfg.val_fraction, vocab_size=vocab_size, seq_len=seq_len)
    else:
        if vocab_size < BYTE_VOCAB:
            raise ValueError(
                f"model.vocab_size={vocab_size}: data.name={cfg.name} is byte-level and needs "
                f"vocab_size >= {BYTE_VOCAB}"
            )
        if cfg.name == "stdlib":
            root = sysconfig.get_paths()["stdlib"]
            files = _stdlib_files(root)
            splits = _byte_splits(files, cfg.val_fraction, seq_len=seq_len, label="stdlib", origin=root)
        else:
            files = _text_files(str(cfg.path))
            splits = _byte_splits(
                files, cfg.val_fraction, seq_len=seq_len, label="text", origin=str(cfg.path)
            )

    for name, split in (("train", splits.train), ("val", splits.val)):
        if split.numel() < seq_len + 2:
            raise ValueError(
                f"model.seq_len={seq_len}: the {name} split has only {split.numel()} tokens, "
                f"each split needs at least seq_len + 2 = {seq_len + 2} ({splits.description})"
            )
    return splits


def global_batch(
    tokens: torch.Tensor, *, seed: int, step: int, batch_size: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) int64 batch of ``step``, each ``[batch_size, seq_len]``."""
    offsets_B = _offsets(tokens, seed=seed, step=step, batch_size=batch_size, seq_len=seq_len)
    return _gather(tokens, offsets_B, seq_len=seq_len)


def rank_batch(
    tokens: torch.Tensor,
    *,
    seed: int,
    step: int,
    global_batch_size: int,
    seq_len: int,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[rank*B/W, (rank+1)*B/W)`` of ``global_batch``; only those rows are gathered."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    if global_batch_size % world_size != 0:
        raise ValueError(
            f"global_batch_size={global_batch_size}: must be divisible by world_size={world_size}"
        )
    offsets_B = _offsets(tokens, seed=seed, step=step, batch_size=global_batch_size, seq_len=seq_len)
    rows = global_batch_size // world_size
    return _gather(tokens, offsets_B[rank * rows : (rank + 1) * rows], seq_len=seq_len)


def _offsets(tokens: torch.Tensor, *, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: both must be >= 1")
    num_starts = tokens.numel() - seq_len  # valid starts: [0, len - seq_len - 1]
    if num_starts < 1:
        raise ValueError(f"seq_len={seq_len}: needs at least seq_len + 1 tokens, got {tokens.numel()}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * _SEED_MULTIPLIER + step) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randint(0, num_starts, (batch_size,), generator=gen, dtype=torch.int64)


def _gather(
    tokens: torch.Tensor, offsets_B: torch.Tensor, *, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # Per-row basic slicing: reads only the touched pages of a memmap and works for any integer
    # dtype (advanced indexing on uint16 is missing from older torch releases).
    rows = [tokens[o : o + seq_len + 1].to(torch.int64) for o in offsets_B.tolist()]
    rows_BL = torch.stack(rows) if rows else torch.empty(0, seq_len + 1, dtype=torch.int64)
    return rows_BL[:, :-1].contiguous(), rows_BL[:, 1:].contiguous()


def _stdlib_files(root: str) -> list[tuple[str, Path]]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def _text_files(spec: str) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every regular file named by a file, directory or glob."""
    expanded = os.path.expanduser(spec)
    if os.path.isfile(expanded):
        path = Path(expanded)
        files = [(path.name, path)]
    elif os.path.isdir(expanded):
        root = Path(expanded)
        files = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()]
    elif glob.has_magic(expanded):
        base = _glob_base(expanded)
        files = []
        for match in glob.glob(expanded, recursive=True):
            path = Path(match)
            if path.is_file():
                files.append((Path(os.path.relpath(path, base)).as_posix(), path))
    else:
        files = []
    if not files:
        raise ValueError(f"data.path={spec!r}: no files match (not a file, a directory or a matching glob)")
    return sorted(files)


def _glob_base(pattern: str) -> str:
    """The directory part of ``pattern`` before its first wildcard: split keys are relative to it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _byte_splits(
    files: list[tuple[str, Path]], val_fraction: float, *, seq_len: int, label: str, origin: str
) -> TokenSplits:
    contents = []
    for _, path in files:
        data = path.read_bytes()
        if label == "text":
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"data.path={origin!r}: {path} is not valid UTF-8 (byte {err.start}); "
                    f"use data.name=tokens for pre-tokenized binary data"
                ) from err
        contents.append(data)
    total = sum(len(c) for c in contents)
    if total == 0:
        where = f"data.path={origin!r}" if label == "text" else f"stdlib at {origin!r}"
        raise ValueError(f"{where}: the {len(files)} matched file(s) are empty")

    if len(files) == 1:
        data = contents[0]
        n_val = _val_size(len(data), val_fraction, seq_len=seq_len)
        train_bytes, val_bytes = data[: len(data) - n_val], data[len(data) - n_val :]
        summary = f"1 file split by position ({1 - val_fraction:.0%} / {val_fraction:.0%})"
    else:
        keys = [zlib.crc32(rel.encode()) % _SPLIT_BUCKETS for rel, _ in files]
        is_val = [k < val_fraction * _SPLIT_BUCKETS for k in keys]
        order = sorted(range(len(files)), key=lambda i: (keys[i], files[i][0]))
        if not any(is_val):
            is_val[order[0]] = True  # the file closest to the val bucket range
        if all(is_val):
            is_val[order[-1]] = False
        train_bytes = FILE_SEPARATOR.join(c for c, v in zip(contents, is_val) if not v)
        val_bytes = FILE_SEPARATOR.join(c for c, v in zip(contents, is_val) if v)
        n_val_files = sum(is_val)
        summary = f"{len(files)} files ({len(files) - n_val_files} train / {n_val_files} val)"

    return TokenSplits(
        train=_bytes_to_tensor(train_bytes),
        val=_bytes_to_tensor(val_bytes),
        description=(
            f"{label}: {summary}, {_human(len(train_bytes))} train / {_human(len(val_bytes))} val bytes "
            f"from {origin}"
        ),
    )


def _load_token_file(path: str, val_fraction: float, *, vocab_size: int, seq_len: int) -> TokenSplits:
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise ValueError(f"data.path={path!r}: no such token file (data.name=tokens)")
    size = file.stat().st_size
    if size == 0:
        raise ValueError(f"data.path={path!r}: the token file is empty")
    if size % 2 != 0:
        raise ValueError(
            f"data.path={path!r}: size {size} bytes is odd, expected little-endian uint16 tokens"
        )
    ids = np.memmap(file, dtype="<u2", mode="r")
    max_id = int(ids.max())
    if max_id >= vocab_size:
        raise ValueError(
            f"data.path={path!r}: token id {max_id} is out of range for model.vocab_size={vocab_size}"
        )
    with warnings.catch_warnings():
        # The memmap is read-only on purpose; torch warns that it cannot be written through.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        all_ids = torch.from_numpy(ids)
    n = all_ids.numel()
    n_val = _val_size(n, val_fraction, seq_len=seq_len)
    return TokenSplits(
        train=all_ids[: n - n_val],
        val=all_ids[n - n_val :],
        description=(
            f"tokens: {_human(n - n_val)} train / {_human(n_val)} val uint16 tokens "
            f"(max id {max_id}) from {path}"
        ),
    )


def _val_size(n: int, val_fraction: float, *, seq_len: int) -> int:
    # The tail share, raised to the minimum a split needs when the corpus leaves room for it.
    n_val = math.ceil(n * val_fraction)
    if n - max(n_val, seq_len + 2) >= seq_len + 2:
        n_val = max(n_val, seq_len + 2)
    return n_val


def _bytes_to_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def _human(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}K"
    return str(n)
