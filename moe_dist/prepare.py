"""Tokenize text, JSONL and parquet files into fixed-size token shards with a manifest.

    python -m moe_dist.prepare corpus/ more.jsonl --tokenizer tok/ --out data/web [--field text] [--workers 8]
    python -m moe_dist.prepare chats.jsonl --sft --prompt-field prompt --response-field response --tokenizer tok/ \\
        --out data/chats
    python -m moe_dist.prepare --verify data/web

Inputs are files, directories (every file below, dot files skipped) or globs. A ``.txt`` (or any other) file is
one document; ``.jsonl`` / ``.json`` / ``.ndjson`` hold one JSON object per line, the document in ``--field``;
``.parquet`` holds it in ``--column``; ``.gz`` files are read decompressed. With ``--sft`` every record is a
prompt/response pair whose loss is masked to the response (and its EOS).

Each document is tokenized with a local ``tokenizer.json`` (``tokenizers`` library; byte-level when none is
given; nothing is ever downloaded), followed by the tokenizer's EOS. Documents go to the validation split when
``crc32(path, position) % 10000 < val_fraction * 10000`` (the path relative to the deepest directory holding all
inputs, the byte offset of a JSONL line or the row of a parquet record): stable when other files change.

Two passes, both parallel over ``--workers`` processes and both resumable: (1) every input chunk (``--chunk-bytes``
of JSONL, a parquet row group, a text file) is tokenized into ``<out>/.work/``; (2) the chunks are cut into
shards of exactly ``--shard-tokens`` tokens. Finished chunks and shards are kept when a run is interrupted, and a
rerun with the same arguments continues; the output does not depend on the number of workers. Bad input (a
missing file, an empty file, a record without the field) is reported in one line before anything is written.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moe_dist.shards import (
    DOC_DTYPE,
    EXTENSIONS,
    FORMAT,
    MANIFEST,
    MASK_DTYPE,
    SPLITS,
    TOKENIZER_FILE,
    dtype_name,
    manifest_path,
    read_manifest,
    shard_name,
    token_dtype,
)
from moe_dist.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

WORK_DIR = ".work"
PLAN_FILE = "plan.json"
SPLIT_BUCKETS = 10_000
ENCODE_BATCH = 512  # documents per tokenizer call
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class Options:
    """How inputs become shards; the defaults are the command line's."""

    tokenizer: str | None = None  # local tokenizer.json or directory; None = byte-level
    eos_token: str | None = None  # overrides the tokenizer's end-of-document token
    field: str = "text"  # JSONL field holding the document text
    column: str = "text"  # parquet column holding the document text
    sft: bool = False  # records are prompt/response pairs, loss on the response only
    prompt_field: str = "prompt"
    response_field: str = "response"
    val_fraction: float = 0.01  # share of documents held out for validation
    shard_tokens: int = 1 << 27  # tokens per shard (the last one of a split is shorter)
    chunk_bytes: int = 64 << 20  # JSONL bytes per work unit


@dataclass(frozen=True)
class Source:
    path: str  # absolute path
    key: str  # path relative to the deepest directory holding all inputs: the split hash uses it
    format: str  # "text", "jsonl" or "parquet"
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Unit:
    source: int  # index into the plan's sources
    start: int  # JSONL: byte offset of the first line; parquet: first row group; text: 0
    end: int  # exclusive


def fail(message: str) -> ValueError:
    return ValueError(message)


# --------------------------------------------------------------------------------------------- planning


def source_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def expand_inputs(inputs: list[str], *, exclude: Path) -> list[Source]:
    """Every input file, in argument order and sorted within a directory or glob; ValueError naming a bad one.

    A file's key (which the split hash uses) is its path relative to the deepest directory holding every
    input: distinct for distinct files, and the same wherever the whole corpus is moved.
    """
    found: list[Path] = []
    seen: set[str] = set()
    for spec in inputs:
        p = Path(spec).expanduser()
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = [
                f
                for f in sorted(p.rglob("*"))
                if f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and exclude not in f.resolve().parents
            ]
        elif glob.has_magic(spec):
            files = [Path(m) for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
            files = [f for f in files if f.is_file()]
        else:
            raise fail(f"input {spec!r}: no such file or directory")
        if not files:
            raise fail(f"input {spec!r}: no files there")
        for f in files:
            resolved = str(f.resolve())
            if resolved not in seen:
                seen.add(resolved)
                found.append(f)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in found])
    sources = []
    for f in found:
        stat = f.stat()
        if stat.st_size == 0:
            raise fail(f"input {str(f)!r}: the file is empty")
        key = Path(os.path.relpath(os.path.abspath(f), root)).as_posix()
        sources.append(Source(str(f.resolve()), key, source_format(f), stat.st_size, stat.st_mtime_ns))
    return sources


def _open_text(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def check_source(source: Source, options: Options) -> None:
    """Cheap checks before anything is written: the first record of a JSONL file, a parquet schema, UTF-8."""
    where = f"input {source.path!r}"
    if source.format == "text":
        if options.sft:
            raise fail(f"{where}: --sft needs JSONL or parquet records with prompt and response fields")
        with _open_text(source.path) as f:
            head = f.read(1 << 16)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start < len(head) - 4:  # not just a character cut at the end of the sample
                raise fail(f"{where}: not UTF-8 text (byte {err.start})") from err
    elif source.format == "jsonl":
        with _open_text(source.path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    _document_of(
                        _parse_record(line, f"{where} line {line_no}"), options, f"{where} line {line_no}"
                    )
                    return
        raise fail(f"{where}: the file holds no records")
    else:
        pq = _pyarrow_parquet(where)
        try:
            meta = pq.ParquetFile(source.path)
        except Exception as err:  # pyarrow raises its own error types for corrupt files
            raise fail(f"{where}: not a readable parquet file ({err})") from err
        wanted = [options.prompt_field, options.response_field] if options.sft else [options.column]
        names = meta.schema_arrow.names
        for column in wanted:
            if column not in names:
                flag = "--prompt-field/--response-field" if options.sft else "--column"
                raise fail(f"{where}: no column {column!r} ({flag}); columns: {', '.join(names)}")
        if meta.metadata.num_rows == 0:
            raise fail(f"{where}: the file holds no rows")


def _pyarrow_parquet(where: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise fail(f"{where}: reading parquet needs pyarrow (pip install -e '.[data]')") from err
    return pq


def plan_units(sources: list[Source], options: Options) -> list[Unit]:
    """Work units: JSONL cut at line starts every ``chunk_bytes``, one per parquet row group, one per text file."""
    units = []
    for i, source in enumerate(sources):
        if source.format == "parquet":
            groups = _pyarrow_parquet(source.path).ParquetFile(source.path).metadata.num_row_groups
            units += [Unit(i, g, g + 1) for g in range(groups)]
        elif source.format == "jsonl" and not source.path.endswith(".gz"):
            starts = [0]
            with open(source.path, "rb") as f:
                while starts[-1] + options.chunk_bytes < source.size:
                    f.seek(starts[-1] + options.chunk_bytes)
                    f.readline()  # to the start of the next line
                    if f.tell() >= source.size:
                        break
                    starts.append(f.tell())
            units += [Unit(i, a, b) for a, b in zip(starts, [*starts[1:], source.size])]
        else:
            units.append(Unit(i, 0, source.size))
    return units


# --------------------------------------------------------------------------------------------- pass 1


def _parse_record(line: bytes, where: str) -> dict:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise fail(f"{where}: not a JSON object ({err})") from err
    if not isinstance(record, dict):
        raise fail(f"{where}: not a JSON object")
    return record


def _document_of(record: dict, options: Options, where: str) -> str | tuple[str, str]:
    fields = [options.prompt_field, options.response_field] if options.sft else [options.field]
    values = []
    for name in fields:
        if name not in record:
            flag = "--prompt-field/--response-field" if options.sft else "--field"
            raise fail(f"{where}: no field {name!r} ({flag}); fields: {', '.join(record) or 'none'}")
        value = record[name]
        if value is not None and not isinstance(value, str):
            raise fail(f"{where}: field {name!r} is {type(value).__name__}, not a string")
        values.append(value or "")
    return (values[0], values[1]) if options.sft else values[0]


def read_documents(source: Source, unit: Unit, options: Options):
    """(split key, document) pairs of one unit, in file order; a document is text or (prompt, response)."""
    where = f"input {source.path!r}"
    if source.format == "text":
        with _open_text(source.path) as f:
            data = f.read()
        try:
            yield source.key, data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise fail(f"{where}: not UTF-8 text (byte {err.start})") from err
    elif source.format == "jsonl":
        with _open_text(source.path) as f:
            if not source.path.endswith(".gz"):
                f.seek(unit.start)
            offset = unit.start
            for line in f if source.path.endswith(".gz") else io.BytesIO(f.read(unit.end - unit.start)):
                if line.strip():
                    at = f"{where} at byte {offset}"
                    yield f"{source.key}:{offset}", _document_of(_parse_record(line, at), options, at)
                offset += len(line)
    else:
        pq = _pyarrow_parquet(where)
        file = pq.ParquetFile(source.path)
        first_row = sum(file.metadata.row_group(g).num_rows for g in range(unit.start))
        columns = [options.prompt_field, options.response_field] if options.sft else [options.column]
        table = file.read_row_group(unit.start, columns=columns)
        values = [table.column(c).to_pylist() for c in columns]
        for row, items in enumerate(zip(*values)):
            at = f"{where} row {first_row + row}"
            record = dict(zip(columns, items))
            yield f"{source.key}:{first_row + row}", _document_of(record, options, at)


def is_val(doc_key: str, val_fraction: float) -> bool:
    return zlib.crc32(doc_key.encode("utf-8")) % SPLIT_BUCKETS < val_fraction * SPLIT_BUCKETS


_TOKENIZERS: dict = {}


def _tokenizer(options: Options) -> ByteTokenizer | HFTokenizer:
    key = (options.tokenizer, options.eos_token)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(options.tokenizer, eos_token=options.eos_token)
    return _TOKENIZERS[key]


def _write_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    array.tofile(tmp)
    os.replace(tmp, path)


def tokenize_unit(job: tuple[str, dict, int, int]) -> int:
    """Pass 1 for one unit (in a worker): its tokens, document lengths and masks per split.

    Returns the job's progress weight (its input bytes)."""
    work_dir, plan, index, weight = job
    options = Options(**plan["options"])
    source = Source(**plan["sources"][plan["units"][index][0]])
    unit = Unit(*plan["units"][index])
    tokenizer = _tokenizer(options)
    dtype = plan["dtype"]
    parts = {split: {"tokens": [], "lengths": [], "mask": [], "bytes": 0} for split in SPLITS}
    skipped = 0

    def flush(batch: list[tuple[str, str | tuple[str, str]]]) -> None:
        texts = [t for _, doc in batch for t in (doc if options.sft else (doc,))]
        encoded = tokenizer.encode_batch(texts)
        per_doc = 2 if options.sft else 1
        for j, (key, doc) in enumerate(batch):
            ids = encoded[j * per_doc : (j + 1) * per_doc]
            eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
            tokens = [*ids[0], *ids[1], *eos] if options.sft else [*ids[0], *eos]
            part = parts["val" if is_val(key, options.val_fraction) else "train"]
            part["tokens"].append(np.asarray(tokens, dtype=dtype))
            part["lengths"].append(len(tokens))
            part["bytes"] += sum(len(t.encode("utf-8")) for t in (doc if options.sft else (doc,)))
            if options.sft:  # the prompt is context only; the response and its EOS are trained
                part["mask"].append(
                    np.r_[np.zeros(len(ids[0]), MASK_DTYPE), np.ones(len(tokens) - len(ids[0]), MASK_DTYPE)]
                )

    batch = []
    for key, doc in read_documents(source, unit, options):
        if not (any(doc) if options.sft else doc):
            skipped += 1
            continue
        batch.append((key, doc))
        if len(batch) == ENCODE_BATCH:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    stem = Path(work_dir) / f"unit_{index:06d}"
    record = {"skipped": skipped}
    for split, part in parts.items():
        tokens = np.concatenate(part["tokens"]) if part["tokens"] else np.zeros(0, dtype)
        _write_atomic(stem.with_suffix(f".{split}.bin"), tokens)
        _write_atomic(stem.with_suffix(f".{split}.len"), np.asarray(part["lengths"], DOC_DTYPE))
        if options.sft:
            mask = np.concatenate(part["mask"]) if part["mask"] else np.zeros(0, MASK_DTYPE)
            _write_atomic(stem.with_suffix(f".{split}.mask"), mask)
        record[split] = {"tokens": len(tokens), "documents": len(part["lengths"]), "bytes": part["bytes"]}
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, stem.with_suffix(".json"))  # written last: the unit is finished
    return weight


# --------------------------------------------------------------------------------------------- pass 2


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(job: tuple) -> int:
    """Pass 2 for one shard (in a worker): tokens [a, b) of a split, cut from the units that overlap them.

    ``pieces``: (unit index, first token of the unit in the split) of those units. Returns the shard's tokens.
    """
    out_dir, work_dir, dtype, sft, split, index, a, b, pieces = job
    out, work = Path(out_dir), Path(work_dir)
    itemsize = np.dtype(dtype).itemsize
    tokens, masks, starts = [], [], []
    for u, unit_first in pieces:
        stem = work / f"unit_{u:06d}"
        lengths = np.fromfile(stem.with_suffix(f".{split}.len"), DOC_DTYPE)
        offset, count = (
            max(a - unit_first, 0),
            min(b - unit_first, int(lengths.sum())) - max(a - unit_first, 0),
        )
        tokens.append(np.fromfile(stem.with_suffix(f".{split}.bin"), dtype, count, offset=offset * itemsize))
        if sft:
            masks.append(np.fromfile(stem.with_suffix(f".{split}.mask"), MASK_DTYPE, count, offset=offset))
        doc_starts = unit_first + np.cumsum(lengths) - lengths
        starts.append(doc_starts[(doc_starts >= a) & (doc_starts < b)] - a)
    name = shard_name(split, index)
    files = {"tokens": np.concatenate(tokens), "docs": np.concatenate(starts).astype(DOC_DTYPE)}
    if sft:
        files["mask"] = np.concatenate(masks)
    assert len(files["tokens"]) == b - a, (name, len(files["tokens"]), a, b)
    digests = {}
    for part, array in files.items():
        path = out / (name + EXTENSIONS[part])
        _write_atomic(path, array)
        digests[part] = _file_sha256(path)
    record = {"name": name, "tokens": b - a, "documents": len(files["docs"]), "sha256": digests}
    tmp = work / f"shard_{name}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, work / f"shard_{name}.json")  # written last: the shard is finished
    return b - a


def shard_jobs(out: Path, work: Path, plan: dict, split: str, unit_tokens: list[int]) -> list[tuple]:
    """One job per shard of ``split`` not finished yet, with the units overlapping it."""
    shard_tokens = plan["options"]["shard_tokens"]
    unit_first = np.concatenate([[0], np.cumsum(unit_tokens)]).tolist()
    total = unit_first[-1]
    jobs = []
    for k in range(-(-total // shard_tokens)):
        a, b = k * shard_tokens, min((k + 1) * shard_tokens, total)
        if (work / f"shard_{shard_name(split, k)}.json").is_file():
            continue
        pieces = [
            (u, unit_first[u])
            for u, n in enumerate(unit_tokens)
            if n and unit_first[u] < b and unit_first[u + 1] > a
        ]
        jobs.append((str(out), str(work), plan["dtype"], plan["options"]["sft"], split, k, a, b, pieces))
    return jobs


# --------------------------------------------------------------------------------------------- driver


class _Workers:
    """Runs jobs in this process (one worker) or in one pool of spawned processes shared by both passes."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            import multiprocessing as mp

            # spawn: clean processes (no inherited tokenizer thread pool); one tokenizer thread per worker
            before = os.environ.get("RAYON_NUM_THREADS")
            os.environ["RAYON_NUM_THREADS"] = before or "1"
            try:
                self.pool = mp.get_context("spawn").Pool(workers)  # the workers start here, with that env
            finally:
                if before is None:
                    del os.environ["RAYON_NUM_THREADS"]

    def run(self, fn, jobs: list, progress) -> None:
        """``fn`` over ``jobs``; each result advances the progress bar."""
        results = map(fn, jobs) if self.pool is None else self.pool.imap_unordered(fn, jobs)
        for done in results:
            progress.update(done)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def prepare(
    inputs: list[str], out: str | Path, options: Options, *, workers: int = 1, progress: bool = False
) -> dict:
    """Runs both passes (resuming what a previous run of the same plan finished); returns the manifest."""
    from tqdm import tqdm

    out = Path(out).expanduser().resolve()
    if not inputs:
        raise fail("no inputs given")
    if not 0 <= options.val_fraction < 1:
        raise fail(f"--val-fraction={options.val_fraction}: must be in [0, 1)")
    if options.shard_tokens < 1 or options.chunk_bytes < 1:
        raise fail("--shard-tokens and --chunk-bytes must be >= 1")
    tokenizer = load_tokenizer(options.tokenizer, eos_token=options.eos_token)
    sources = expand_inputs(inputs, exclude=out)
    for source in sources:
        check_source(source, options)
    units = plan_units(sources, options)
    plan = {
        "format": FORMAT,
        "options": asdict(options),
        "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256},
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": token_dtype(tokenizer.vocab_size),
        "sources": [asdict(s) for s in sources],
        "units": [[u.source, u.start, u.end] for u in units],
    }
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    existing = manifest_path(out)
    if existing is not None:
        manifest = json.loads(existing.read_text())
        if manifest.get("plan_id") == plan_id:
            return manifest
        raise fail(
            f"--out={str(out)!r}: holds a different prepared dataset; choose another --out or delete it"
        )
    work = out / WORK_DIR
    if (work / PLAN_FILE).is_file() and json.loads((work / PLAN_FILE).read_text()).get("plan_id") != plan_id:
        raise fail(
            f"--out={str(out)!r}: holds an unfinished preparation of other inputs or options; "
            "rerun that one, or choose another --out"
        )
    if out.exists() and not work.is_dir() and any(out.iterdir()):
        raise fail(f"--out={str(out)!r}: exists and is not empty")

    # Everything checked: from here on files are written.
    work.mkdir(parents=True, exist_ok=True)
    (work / PLAN_FILE).write_text(json.dumps({"plan_id": plan_id, **plan}))
    workers = max(1, min(workers, len(units)))
    groups = Counter(u.source for u in units)  # progress weight of a unit: its share of the input bytes
    weights = [
        sources[u.source].size // groups[u.source]
        if sources[u.source].format == "parquet"
        else u.end - u.start
        for u in units
    ]
    todo = [i for i in range(len(units)) if not (work / f"unit_{i:06d}.json").is_file()]
    pool = _Workers(workers)
    try:
        with tqdm(
            total=sum(weights), unit="B", unit_scale=True, desc="tokenize", disable=not progress
        ) as bar:
            bar.update(sum(weights) - sum(weights[i] for i in todo))
            pool.run(tokenize_unit, [(str(work), plan, i, weights[i]) for i in todo], bar)
        records = [json.loads((work / f"unit_{i:06d}.json").read_text()) for i in range(len(units))]
        split_tokens = {s: sum(r[s]["tokens"] for r in records) for s in SPLITS}
        if split_tokens["train"] == 0:
            raise fail(f"inputs {inputs}: no non-empty documents in the training split")
        jobs = [
            job
            for split in SPLITS
            for job in shard_jobs(out, work, plan, split, [r[split]["tokens"] for r in records])
        ]
        total = sum(j[7] - j[6] for j in jobs)
        with tqdm(total=total, unit="tok", unit_scale=True, desc="shards", disable=not progress) as bar:
            pool.run(write_shard, jobs, bar)
    finally:
        pool.close()

    if tokenizer.json_text is not None:
        (out / TOKENIZER_FILE).write_text(tokenizer.json_text, encoding="utf-8")
    splits = {}
    for split in SPLITS:
        num_shards = -(-split_tokens[split] // options.shard_tokens)
        shards = [
            json.loads((work / f"shard_{shard_name(split, k)}.json").read_text()) for k in range(num_shards)
        ]
        splits[split] = {
            "tokens": split_tokens[split],
            "documents": sum(r[split]["documents"] for r in records),
            "text_bytes": sum(r[split]["bytes"] for r in records),
            "shards": shards,
        }
    per_source = {}
    for unit, record in zip(units, records):
        per_source[unit.source] = per_source.get(unit.source, 0) + sum(record[s]["documents"] for s in SPLITS)
    manifest = {
        "format": FORMAT,
        "plan_id": plan_id,
        "kind": "sft" if options.sft else "text",
        "dtype": dtype_name(plan["dtype"]),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": {
            "name": tokenizer.name,
            "sha256": tokenizer.sha256,
            "file": TOKENIZER_FILE if tokenizer.json_text is not None else None,
        },
        "options": {k: v for k, v in asdict(options).items() if k not in ("tokenizer", "eos_token")},
        "sources": [
            {"path": s.path, "format": s.format, "bytes": s.size, "documents": per_source.get(i, 0)}
            for i, s in enumerate(sources)
        ],
        "skipped_empty_documents": sum(r["skipped"] for r in records),
        "splits": splits,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)  # written last: the dataset is complete
    shutil.rmtree(work)
    return manifest


def verify(path: str | Path) -> str:
    """Checks every shard file against the sha256 in the manifest; returns a summary line, raises on a mismatch."""
    root, manifest = read_manifest(path, key="--verify")
    files = 0
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            for part, digest in shard["sha256"].items():
                if _file_sha256(root / (shard["name"] + EXTENSIONS[part])) != digest:
                    raise fail(
                        f"--verify={str(path)!r}: {shard['name'] + EXTENSIONS[part]} does not match its sha256"
                    )
                files += 1
    return f"{root}: {files} shard files match their sha256 digests"


def summary(manifest: dict, out: str | Path, seconds: float) -> str:
    t, v = manifest["splits"]["train"], manifest["splits"]["val"]
    return (
        f"{out}: {t['documents'] + v['documents']:,} documents, {t['tokens'] + v['tokens']:,} tokens "
        f"(train {t['tokens']:,} in {len(t['shards'])} shards / val {v['tokens']:,} in {len(v['shards'])}), "
        f"{manifest['dtype']}, vocab {manifest['vocab_size']:,}, eos {manifest['eos_id']}, "
        f"{manifest['kind']}, {seconds:.1f} s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_dist.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", help="files, directories or globs")
    parser.add_argument("--out", help="output directory")
    parser.add_argument(
        "--tokenizer", help="local tokenizer.json or a directory holding one (default: byte-level)"
    )
    parser.add_argument("--eos-token", help="end-of-document token (default: from the tokenizer)")
    parser.add_argument(
        "--field", default=Options.field, help="JSONL field with the document text (default: text)"
    )
    parser.add_argument(
        "--column", default=Options.column, help="parquet column with the document text (default: text)"
    )
    parser.add_argument(
        "--sft", action="store_true", help="prompt/response records, loss on the response only"
    )
    parser.add_argument("--prompt-field", default=Options.prompt_field)
    parser.add_argument("--response-field", default=Options.response_field)
    parser.add_argument(
        "--val-fraction", type=float, default=Options.val_fraction, help="documents held out (default: 0.01)"
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=Options.shard_tokens, help="tokens per shard (default: 2^27)"
    )
    parser.add_argument(
        "--chunk-bytes", type=int, default=Options.chunk_bytes, help="JSONL bytes per work unit"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)"
    )
    parser.add_argument(
        "--verify", metavar="DIR", help="check the shards of a prepared dataset against its sha256"
    )
    args = parser.parse_args(argv)
    try:
        if args.verify:
            print(verify(args.verify))
            return
        if not args.out:
            raise fail("--out: required (the output directory)")
        options = Options(
            tokenizer=args.tokenizer,
            eos_token=args.eos_token,
            field=args.field,
            column=args.column,
            sft=args.sft,
            prompt_field=args.prompt_field,
            response_field=args.response_field,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            chunk_bytes=args.chunk_bytes,
        )
        started = time.perf_counter()
        manifest = prepare(args.inputs, args.out, options, workers=args.workers, progress=sys.stderr.isatty())
    except ValueError as err:
        print(f"moe_dist.prepare: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary(manifest, args.out, time.perf_counter() - started))
    if manifest["splits"]["val"]["tokens"] == 0:
        print("warning: the validation split is empty (raise --val-fraction)", file=sys.stderr)


if __name__ == "__main__":
    main()
