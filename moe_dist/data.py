"""Token corpora and the deterministic batch sampler.

Sources (``data.name``):
  stdlib  the ``*.py`` sources of the running Python's standard library, byte-level (vocab 256)
  text    UTF-8 files from ``data.path`` (a file, a directory or a glob), byte-level (vocab 256)
  tokens  a dataset prepared by ``python -m moe_dist.prepare`` (``data.path`` = its directory or manifest,
          shards memory-mapped, validation from its held-out shards), a weighted mixture of several
          (``data.mixture={dir_a: 0.7, dir_b: 0.3}``), or a flat little-endian uint16 token file

Byte-level corpora join their files with ``b"\\n\\n"`` in sorted relative-path order and hold out
whole files: a file is validation when ``crc32(relative_path) % 10_000 < val_fraction * 10_000``,
so the split does not move when files are added elsewhere. A single file (and the flat token file) is
split by position instead: its last ``val_fraction`` is validation. Every file is a document.

The batch of a step is a pure function of ``(seed, step)``: B windows of seq_len + 1 tokens at start
offsets drawn from a private ``torch.Generator``, so every world size sees the same global batch and each
rank reads only its contiguous slice of rows (from memory-mapped shards: only the pages it touches).
Supervised fine-tuning data starts its windows at document starts, and its targets outside the responses
are ``IGNORE_INDEX``. A mixture picks the source of global sample i from the Weyl sequence frac(i·φ⁻¹)
against the cumulative weights: a pure function of (step, row) whose source counts stay within a few
samples of the weights over any number of steps.

Legend: B rows of a batch, S sequence length.
"""

from __future__ import annotations

import glob
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from moe_dist.config import DATASETS, DataConfig
from moe_dist.model.loss import IGNORE_INDEX
from moe_dist.shards import DOC_DTYPE, EXTENSIONS, MASK_DTYPE, TOKENIZER_FILE, manifest_path, read_manifest
from moe_dist.transfer import to_device

BYTE_VOCAB = 256
FILE_SEPARATOR = b"\n\n"
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
_SPLIT_BUCKETS = 10_000
_SEED_MULTIPLIER = 1_000_003
_GOLDEN = (math.sqrt(5) - 1) / 2  # the Weyl step of the mixture's source sequence


@dataclass
class Segment:
    """A contiguous piece of a token stream: one in-memory array or one memory-mapped shard."""

    tokens: np.ndarray  # 1-D integer token ids
    doc_starts: np.ndarray | None  # sorted offsets (in this segment) where a document starts; None: unknown
    loss_mask: np.ndarray | None  # uint8, 1 where the token is a trained target; None: every token is


class TokenStream:
    """One split as a single token sequence over its segments (shards), read window by window."""

    def __init__(self, segments: list[Segment], *, align_to_documents: bool = False):
        self.segments = [s for s in segments if len(s.tokens)]
        lengths = [len(s.tokens) for s in self.segments]
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # first token of each segment
        self.num_tokens = int(self.starts[-1])
        self.has_documents = all(s.doc_starts is not None for s in self.segments)
        self.has_loss_mask = any(s.loss_mask is not None for s in self.segments)
        # Supervised fine-tuning: every window starts at a document, so no example loses its prompt.
        self.align_to_documents = align_to_documents
        self._eligible: dict[int, int] = {}  # seq_len → documents a whole window fits after
        if align_to_documents:
            assert self.has_documents, "aligning windows to documents needs document boundaries"
            self.doc_counts = np.concatenate([[0], np.cumsum([len(s.doc_starts) for s in self.segments])])

    @classmethod
    def from_array(
        cls, tokens: np.ndarray | torch.Tensor, doc_starts: np.ndarray | None = None
    ) -> TokenStream:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.numpy()
        return cls([Segment(np.asarray(tokens), doc_starts, None)])

    def _pieces(self, start: int, length: int):
        """(segment, first, last) covering tokens [start, start + length), in order."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        end = start + length
        while start < end:
            seg_start = int(self.starts[i])
            stop = min(end, int(self.starts[i + 1]))
            yield self.segments[i], start - seg_start, stop - seg_start
            start, i = stop, i + 1

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64 (basic slices of the memmaps: only those pages are read)."""
        pieces = [seg.tokens[a:b].astype(np.int64) for seg, a, b in self._pieces(start, length)]
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def loss_mask(self, start: int, length: int) -> np.ndarray:
        """1 where the token at that position is a trained target (every token outside SFT data)."""
        pieces = [
            np.ones(b - a, MASK_DTYPE) if seg.loss_mask is None else np.asarray(seg.loss_mask[a:b])
            for seg, a, b in self._pieces(start, length)
        ]
        return np.concatenate(pieces) if pieces else np.zeros(0, MASK_DTYPE)

    def doc_starts(self, start: int, length: int) -> np.ndarray:
        """Offsets relative to ``start`` where a document starts inside [start, start + length)."""
        out, base = [np.zeros(0, np.int64)], 0
        for seg, a, b in self._pieces(start, length):
            lo, hi = np.searchsorted(seg.doc_starts, [a, b])
            out.append(np.asarray(seg.doc_starts[lo:hi]) - a + base)
            base += b - a
        return np.concatenate(out)

    def num_window_starts(self, seq_len: int) -> int:
        """Valid window starts: [0, num_tokens - seq_len - 1] (a window holds seq_len + 1 tokens)."""
        return self.num_tokens - seq_len

    def document_window_start(self, u: float, seq_len: int) -> int:
        """The start of document floor(u · n) among the n documents a whole window fits after."""
        if seq_len not in self._eligible:  # documents are sorted: the eligible ones are a prefix
            limit = self.num_window_starts(seq_len)
            self._eligible[seq_len] = int(
                sum(
                    np.searchsorted(s.doc_starts, limit - self.starts[i]) for i, s in enumerate(self.segments)
                )
            )
        eligible = self._eligible[seq_len]
        if eligible < 1:
            raise ValueError(f"seq_len={seq_len}: no document starts early enough for a whole window")
        doc = min(int(u * eligible), eligible - 1)
        i = int(np.searchsorted(self.doc_counts, doc, side="right")) - 1
        return int(self.starts[i] + self.segments[i].doc_starts[doc - self.doc_counts[i]])


@dataclass
class Mixture:
    """Several token streams sampled by weight (``data.mixture``)."""

    streams: list[TokenStream]
    weights: list[float]  # normalised to sum to 1
    names: list[str]

    def source_of(self, sample: int) -> int:
        """Source of global sample ``sample``: the Weyl sequence against the cumulative weights."""
        u = (sample * _GOLDEN) % 1.0
        return min(int(np.searchsorted(np.cumsum(self.weights), u, side="right")), len(self.weights) - 1)


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, S] int64
    targets: torch.Tensor  # [B, S] int64, IGNORE_INDEX where a token carries no loss (SFT prompts)
    doc_ids: torch.Tensor | None  # [B, S] document index of every token inside its row (data.document_mask)
    global_targets: int  # targets carrying loss in the *global* batch (for the token-mean loss)

    def rows(self, rows: slice, device: torch.device | str = "cpu") -> Batch:
        """These rows with every tensor field on ``device`` (pinned, non-blocking copies on CUDA)."""
        device = torch.device(device)
        doc_ids = None if self.doc_ids is None else to_device(self.doc_ids[rows], device)
        return replace(
            self,
            inputs=to_device(self.inputs[rows], device),
            targets=to_device(self.targets[rows], device),
            doc_ids=doc_ids,
        )

    def model_kwargs(self) -> dict:
        """Keyword arguments of ``Transformer.forward`` besides tokens and targets."""
        return {} if self.doc_ids is None else {"doc_ids_BS": self.doc_ids}


@dataclass
class TokenSplits:
    train: TokenStream | Mixture  # training tokens
    val: TokenStream | Mixture  # held-out tokens
    description: str  # one line saying what was loaded and from where
    tokenizer_file: str | None = None  # tokenizer.json of a prepared dataset (None: byte-level or unknown)
    val_bytes_per_token: float | None = None  # UTF-8 text bytes per validation token (bits per byte)


def load_tokens(cfg: DataConfig, *, vocab_size: int, seq_len: int) -> TokenSplits:
    """Loads the corpus named by ``cfg`` and splits it; raises ValueError naming the config key."""
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name={cfg.name!r}: must be one of {DATASETS}")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"data.val_fraction={cfg.val_fraction!r}: must be in (0, 1)")
    if cfg.name in ("text", "tokens") and not cfg.path and not cfg.mixture:
        raise ValueError(f"data.path={cfg.path!r}: is required for data.name={cfg.name}")

    if cfg.name == "tokens" and cfg.mixture:
        splits = _load_mixture(cfg, vocab_size=vocab_size, seq_len=seq_len)
    elif cfg.name == "tokens":
        splits = _load_token_data(str(cfg.path), cfg, key="data.path", vocab_size=vocab_size, seq_len=seq_len)
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
        for stream in split.streams if isinstance(split, Mixture) else [split]:
            if stream.num_tokens < seq_len + 2:
                raise ValueError(
                    f"model.seq_len={seq_len}: the {name} split has only {stream.num_tokens} tokens, "
                    f"each split needs at least seq_len + 2 = {seq_len + 2} ({splits.description})"
                )
            if cfg.document_mask and not stream.has_documents:
                raise ValueError(
                    f"data.document_mask={cfg.document_mask}: {splits.description} has no document "
                    "boundaries (a flat token file); prepare it with python -m moe_dist.prepare"
                )
    return splits


def global_batch(
    source: TokenStream | Mixture | torch.Tensor,
    *,
    seed: int,
    step: int,
    batch_size: int,
    seq_len: int,
    document_mask: bool = False,
) -> Batch:
    """The batch of ``step``: ``batch_size`` rows of ``seq_len`` tokens."""
    return rank_batch(
        source,
        seed=seed,
        step=step,
        global_batch_size=batch_size,
        seq_len=seq_len,
        rank=0,
        world_size=1,
        document_mask=document_mask,
    )


def rank_batch(
    source: TokenStream | Mixture | torch.Tensor,
    *,
    seed: int,
    step: int,
    global_batch_size: int,
    seq_len: int,
    rank: int,
    world_size: int,
    document_mask: bool = False,
) -> Batch:
    """Rows ``[rank*B/W, (rank+1)*B/W)`` of the global batch; only those rows' tokens are read."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    if global_batch_size % world_size != 0:
        raise ValueError(
            f"global_batch_size={global_batch_size}: must be divisible by world_size={world_size}"
        )
    if isinstance(source, torch.Tensor):
        if source.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(source.shape)}")
        source = TokenStream.from_array(source)
    windows = _windows(source, seed=seed, step=step, batch_size=global_batch_size, seq_len=seq_len)
    rows = global_batch_size // world_size
    mine = windows[rank * rows : (rank + 1) * rows]
    tokens_BL = torch.from_numpy(
        np.stack([s.read(o, seq_len + 1) for s, o in mine]) if mine else np.zeros((0, seq_len + 1), np.int64)
    )
    inputs, targets = tokens_BL[:, :-1].contiguous(), tokens_BL[:, 1:].contiguous()
    global_targets = global_batch_size * seq_len
    if any(s.has_loss_mask for s, _ in windows):
        # Every rank counts the trained targets of all rows (masks only): the loss is a mean over them.
        global_targets = sum(int(s.loss_mask(o + 1, seq_len).sum()) for s, o in windows)
        if mine:
            trained = torch.from_numpy(np.stack([s.loss_mask(o + 1, seq_len) for s, o in mine])).bool()
            targets = targets.masked_fill(~trained, IGNORE_INDEX)
    doc_ids = None
    if document_mask:
        doc_ids = torch.zeros(len(mine), seq_len, dtype=torch.int64)
        for row, (s, o) in enumerate(mine):
            starts = s.doc_starts(o + 1, seq_len - 1) + 1  # a document starting at input 0 changes nothing
            doc_ids[row, starts] = 1
        doc_ids = doc_ids.cumsum(dim=1)
    return Batch(inputs, targets, doc_ids, global_targets)


def _windows(
    source: TokenStream | Mixture, *, seed: int, step: int, batch_size: int, seq_len: int
) -> list[tuple[TokenStream, int]]:
    """(stream, start offset) of every row of the global batch of ``step``."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: both must be >= 1")
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * _SEED_MULTIPLIER + step) & 0xFFFF_FFFF_FFFF_FFFF)
    if isinstance(source, Mixture):
        uniform = torch.rand(batch_size, dtype=torch.float64, generator=gen).tolist()
        out = []
        for row, u in enumerate(uniform):
            stream = source.streams[source.source_of(step * batch_size + row)]
            out.append((stream, _start_of(stream, u, seq_len)))
        return out
    num_starts = source.num_window_starts(seq_len)
    if num_starts < 1:
        raise ValueError(f"seq_len={seq_len}: needs at least seq_len + 1 tokens, got {source.num_tokens}")
    if source.align_to_documents:
        uniform = torch.rand(batch_size, dtype=torch.float64, generator=gen).tolist()
        return [(source, source.document_window_start(u, seq_len)) for u in uniform]
    offsets = torch.randint(0, num_starts, (batch_size,), generator=gen, dtype=torch.int64)
    return [(source, o) for o in offsets.tolist()]


def _start_of(stream: TokenStream, u: float, seq_len: int) -> int:
    if stream.align_to_documents:
        return stream.document_window_start(u, seq_len)
    return min(int(u * stream.num_window_starts(seq_len)), stream.num_window_starts(seq_len) - 1)


# --------------------------------------------------------------------------------------------- byte corpora


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


def _joined(contents: list[bytes]) -> TokenStream:
    """Files joined by the separator; every file is a document (the separator ends the one before)."""
    sizes = np.array([len(c) + len(FILE_SEPARATOR) for c in contents], dtype=np.int64)
    doc_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(DOC_DTYPE)
    data = FILE_SEPARATOR.join(contents)
    return TokenStream.from_array(np.frombuffer(data, dtype=np.uint8).copy(), doc_starts)


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
        train, val = _joined([data[: len(data) - n_val]]), _joined([data[len(data) - n_val :]])
        summary = f"1 file split by position ({1 - val_fraction:.0%} / {val_fraction:.0%})"
    else:
        keys = [zlib.crc32(rel.encode()) % _SPLIT_BUCKETS for rel, _ in files]
        is_val = [k < val_fraction * _SPLIT_BUCKETS for k in keys]
        order = sorted(range(len(files)), key=lambda i: (keys[i], files[i][0]))
        if not any(is_val):
            is_val[order[0]] = True  # the file closest to the val bucket range
        if all(is_val):
            is_val[order[-1]] = False
        train = _joined([c for c, v in zip(contents, is_val) if not v])
        val = _joined([c for c, v in zip(contents, is_val) if v])
        n_val_files = sum(is_val)
        summary = f"{len(files)} files ({len(files) - n_val_files} train / {n_val_files} val)"

    return TokenSplits(
        train=train,
        val=val,
        description=(
            f"{label}: {summary}, {_human(train.num_tokens)} train / {_human(val.num_tokens)} val bytes "
            f"from {origin}"
        ),
        val_bytes_per_token=1.0,
    )


# --------------------------------------------------------------------------------------------- token data


def _load_token_data(path: str, cfg: DataConfig, *, key: str, vocab_size: int, seq_len: int) -> TokenSplits:
    """A prepared dataset (directory or manifest.json), or a flat uint16 token file."""
    if manifest_path(path) is not None:
        return _load_prepared(path, key=key, vocab_size=vocab_size)
    return _load_token_file(path, cfg.val_fraction, key=key, vocab_size=vocab_size, seq_len=seq_len)


def _load_prepared(path: str, *, key: str, vocab_size: int) -> TokenSplits:
    root, manifest = read_manifest(path, key=key)
    if manifest["vocab_size"] > vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab_size}: smaller than the {manifest['vocab_size']:,} ids of the tokenizer "
            f"of {key}={path!r} ({manifest['tokenizer']['name']})"
        )
    dtype = {"uint16": "<u2", "uint32": "<u4"}[manifest["dtype"]]
    sft = manifest["kind"] == "sft"
    streams = {}
    for split in ("train", "val"):
        segments = []
        for shard in manifest["splits"][split]["shards"]:
            stem = root / shard["name"]
            segments.append(
                Segment(
                    tokens=_memmap(stem.with_suffix(EXTENSIONS["tokens"]), dtype),
                    doc_starts=_memmap(stem.with_suffix(EXTENSIONS["docs"]), DOC_DTYPE),
                    loss_mask=_memmap(stem.with_suffix(EXTENSIONS["mask"]), MASK_DTYPE) if sft else None,
                )
            )
        streams[split] = TokenStream(segments, align_to_documents=sft)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    tokenizer = manifest["tokenizer"]
    return TokenSplits(
        train=streams["train"],
        val=streams["val"],
        description=(
            f"tokens: {_human(train['tokens'])} train / {_human(val['tokens'])} val {manifest['dtype']} tokens "
            f"({train['documents'] + val['documents']:,} {'SFT examples' if sft else 'documents'}, "
            f"{len(train['shards'])} + {len(val['shards'])} shards, vocab {manifest['vocab_size']:,}) from {root}"
        ),
        tokenizer_file=str(root / TOKENIZER_FILE) if tokenizer.get("file") else None,
        val_bytes_per_token=val["text_bytes"] / val["tokens"] if val["tokens"] else None,
    )


def _memmap(path: Path, dtype: str) -> np.ndarray:
    size = path.stat().st_size
    if size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _load_mixture(cfg: DataConfig, *, vocab_size: int, seq_len: int) -> TokenSplits:
    if not isinstance(cfg.mixture, dict) or not cfg.mixture:
        raise ValueError(f"data.mixture={cfg.mixture!r}: must map dataset paths to weights")
    parts, weights, tokenizers = [], [], {}
    for path, weight in cfg.mixture.items():
        key = f"data.mixture[{path}]"
        if not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{key}={weight!r}: weights must be > 0")
        split = _load_token_data(str(path), cfg, key=key, vocab_size=vocab_size, seq_len=seq_len)
        parts.append(split)
        weights.append(float(weight))
        tokenizers[path] = _tokenizer_identity(str(path))
    if len(set(tokenizers.values())) > 1:
        raise ValueError(
            "data.mixture: the datasets were tokenized differently: "
            + "; ".join(f"{p}: {t}" for p, t in tokenizers.items())
        )
    total = sum(weights)
    names = [str(p) for p in cfg.mixture]
    share = ", ".join(f"{w / total:.0%} {n}" for n, w in zip(names, weights))
    val_rates = [p.val_bytes_per_token for p in parts]
    return TokenSplits(
        train=Mixture([p.train for p in parts], [w / total for w in weights], names),
        val=Mixture([p.val for p in parts], [w / total for w in weights], names),
        description=f"mixture of {len(parts)} ({share})",
        tokenizer_file=parts[0].tokenizer_file,
        val_bytes_per_token=(
            sum(r * w for r, w in zip(val_rates, weights)) / total if None not in val_rates else None
        ),
    )


def _tokenizer_identity(path: str) -> str:
    """How a dataset was tokenized: its tokenizer's sha256, "byte-level", or the flat file's dtype."""
    file = manifest_path(path)
    if file is None:
        return "uint16 token file"
    _, manifest = read_manifest(path, key="data.mixture")
    return manifest["tokenizer"]["sha256"] or manifest["tokenizer"]["name"]


def _load_token_file(
    path: str, val_fraction: float, *, key: str, vocab_size: int, seq_len: int
) -> TokenSplits:
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise ValueError(f"{key}={path!r}: no such token file or prepared dataset (data.name=tokens)")
    size = file.stat().st_size
    if size == 0:
        raise ValueError(f"{key}={path!r}: the token file is empty")
    if size % 2 != 0:
        raise ValueError(f"{key}={path!r}: size {size} bytes is odd, expected little-endian uint16 tokens")
    ids = np.memmap(file, dtype="<u2", mode="r")
    max_id = int(ids.max())
    if max_id >= vocab_size:
        raise ValueError(
            f"{key}={path!r}: token id {max_id} is out of range for model.vocab_size={vocab_size}"
        )
    n = len(ids)
    n_val = _val_size(n, val_fraction, seq_len=seq_len)
    return TokenSplits(
        train=TokenStream.from_array(ids[: n - n_val]),
        val=TokenStream.from_array(ids[n - n_val :]),
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


def _human(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}K"
    return str(n)
