"""The on-disk format of a prepared token dataset (written by ``moe_dist.prepare``, read by ``moe_dist.data``).

    <dir>/manifest.json          what is here: dtype, vocab size, EOS id, tokenizer hash, sources, shards
    <dir>/tokenizer.json         a copy of the tokenizer (absent for byte-level)
    <dir>/train_00000.bin        token ids, little-endian uint16 (vocab <= 65,536) or uint32, fixed size
    <dir>/train_00000.docs       int64: offsets in this shard where a document starts (sorted)
    <dir>/train_00000.mask       uint8, supervised fine-tuning only: 1 where the token is a trained target
    <dir>/val_00000.bin ...      the held-out documents, same layout

A split is one token stream cut into shards of ``shard_tokens`` tokens (the last one shorter); a document
may continue in the next shard. Every file is raw little-endian numbers, so ``numpy.memmap`` reads any
window without loading a shard. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "moe_dist-tokens/1"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
EXTENSIONS = {"tokens": ".bin", "docs": ".docs", "mask": ".mask"}
DOC_DTYPE = "<i8"
MASK_DTYPE = "u1"
KINDS = ("text", "sft")


def token_dtype(vocab_size: int) -> str:
    """numpy dtype of the token files: uint16 when every id fits, else uint32."""
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def dtype_name(dtype: str) -> str:
    return {"<u2": "uint16", "<u4": "uint32"}[dtype]


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def manifest_path(path: str | Path) -> Path | None:
    """``path`` itself when it is a manifest file, ``path/manifest.json`` when that exists, else None."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == MANIFEST:
        return p
    if p.is_dir() and (p / MANIFEST).is_file():
        return p / MANIFEST
    return None


def read_manifest(path: str | Path, *, key: str) -> tuple[Path, dict]:
    """(dataset directory, manifest) after checking the manifest against its shard files.

    Sizes only (cheap at any dataset size): a missing, truncated or extended shard is a ValueError that names
    ``key`` and the file. ``python -m moe_dist.prepare --verify DIR`` checks every sha256 as well.
    """
    file = manifest_path(path)
    where = f"{key}={str(path)!r}"
    if file is None:
        raise ValueError(f"{where}: no {MANIFEST} there (prepare data with python -m moe_dist.prepare)")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: {file} is not valid JSON ({err})") from err
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise ValueError(f"{where}: {file} has format {found!r}, expected {FORMAT!r}")
    try:
        _check_shards(manifest, file.parent, where=where)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: {file} is not a complete manifest (missing {err})") from err
    return file.parent, manifest


def _check_shards(manifest: dict, root: Path, *, where: str) -> None:
    itemsize = 2 if manifest["dtype"] == "uint16" else 4
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            expected = {"tokens": shard["tokens"] * itemsize, "docs": shard["documents"] * 8}
            if manifest["kind"] == "sft":
                expected["mask"] = shard["tokens"]
            for part, size in expected.items():
                f = root / (shard["name"] + EXTENSIONS[part])
                if not f.is_file():
                    raise ValueError(f"{where}: shard file {f.name} is missing")
                if f.stat().st_size != size:
                    raise ValueError(
                        f"{where}: shard file {f.name} has {f.stat().st_size} bytes but the manifest says {size} "
                        "(a corrupt shard, or a manifest that does not match its shards)"
                    )
