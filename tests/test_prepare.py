"""Preparing real data (python -m moe_dist.prepare) and reading it back (data.name=tokens): shards equal to
tokenizing every document by hand, deterministic at any worker count, resumable, uint32 above 65,536 ids,
mixtures by weight, document boundaries, SFT loss masks, and bad input refused in one line."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_dist.prepare as prep
from moe_dist.config import DataConfig
from moe_dist.data import Mixture, global_batch, load_tokens, rank_batch
from moe_dist.model.loss import IGNORE_INDEX
from moe_dist.shards import read_manifest

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("pyarrow")

NUM_ADDED = 65_600  # added tokens that push the vocabulary past 65,536 ids (uint32 shards)


def options(**overrides) -> prep.Options:
    """Small shards and work units, so that a few KiB of test input spans several of each."""
    return prep.Options(**{"val_fraction": 0.2, "shard_tokens": 3000, "chunk_bytes": 20_000, **overrides})


def train_bpe(files: list[Path], path: Path, *, vocab_size: int = 400, added: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    if added:
        tok.add_tokens([f"<x{i}>" for i in range(added)])
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Standard-library sources as a text directory, JSONL (two files) and parquet (row groups of 4)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-m]*.py"))[:36]
    texts = [p.read_text(encoding="utf-8")[:3000] for p in stdlib]
    (root / "text").mkdir()
    for i, t in enumerate(texts[:8]):
        (root / "text" / f"doc{i:02d}.txt").write_text(t, encoding="utf-8")
    with open(root / "a.jsonl", "w") as f:
        for t in texts[8:20]:
            f.write(json.dumps({"text": t, "meta": 1}) + "\n")
        f.write(json.dumps({"text": ""}) + "\n")  # an empty document: skipped and counted
    with open(root / "b.jsonl", "w") as f:
        for t in texts[20:24]:
            f.write(json.dumps({"text": t}) + "\n")
    pq.write_table(pa.table({"text": texts[24:36]}), root / "c.parquet", row_group_size=4)
    tok = train_bpe(list((root / "text").iterdir()), root / "tokenizer.json")
    inputs = [str(root / "text"), str(root / "a.jsonl"), str(root / "b.jsonl"), str(root / "c.parquet")]
    keys = [f"text/doc{i:02d}.txt" for i in range(8)]  # the split keys prepare uses, in order
    offset = 0
    for t in [*texts[8:20], ""]:
        keys.append(f"a.jsonl:{offset}")
        offset += len(json.dumps({"text": t, "meta": 1})) + 1
    offset = 0
    for t in texts[20:24]:
        keys.append(f"b.jsonl:{offset}")
        offset += len(json.dumps({"text": t})) + 1
    keys += [f"c.parquet:{row}" for row in range(12)]
    docs = [*texts[:20], "", *texts[20:36]]
    out = root / "prepared"
    manifest = prep.prepare(inputs, out, options(tokenizer=str(tok)))
    return {
        "root": root,
        "inputs": inputs,
        "tok": tok,
        "docs": docs,
        "keys": keys,
        "out": out,
        "manifest": manifest,
    }


def expected_streams(corpus: dict, val_fraction: float = 0.2) -> dict[str, tuple[list[int], list[int]]]:
    """(tokens, document starts) per split, tokenizing every document by hand with the tokenizers library."""
    tok = tokenizers.Tokenizer.from_file(str(corpus["tok"]))
    eos = tok.token_to_id("<|endoftext|>")
    out = {"train": ([], []), "val": ([], [])}
    for key, doc in zip(corpus["keys"], corpus["docs"]):
        if not doc:
            continue
        split = "val" if zlib.crc32(key.encode()) % 10_000 < val_fraction * 10_000 else "train"
        tokens, starts = out[split]
        starts.append(len(tokens))
        tokens += [*tok.encode(doc, add_special_tokens=False).ids, eos]
    return out


def read_split(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    root, manifest = read_manifest(out, key="test")
    tokens, starts, base = [], [], 0
    for shard in manifest["splits"][split]["shards"]:
        dtype = "<u2" if manifest["dtype"] == "uint16" else "<u4"
        tokens.append(np.fromfile(root / f"{shard['name']}.bin", dtype))
        starts.append(np.fromfile(root / f"{shard['name']}.docs", "<i8") + base)
        base += shard["tokens"]
    return np.concatenate(tokens), np.concatenate(starts)


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------- prepare


def test_shards_equal_tokenizing_every_document_by_hand(corpus):
    manifest = corpus["manifest"]
    expected = expected_streams(corpus)
    for split in ("train", "val"):
        tokens, starts = read_split(corpus["out"], split)
        assert tokens.tolist() == expected[split][0], split
        assert starts.tolist() == expected[split][1], split
        info = manifest["splits"][split]
        assert info["tokens"] == len(tokens) and info["documents"] == len(starts)
        assert [s["tokens"] for s in info["shards"][:-1]] == [3000] * (len(info["shards"]) - 1)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 400 and manifest["eos_id"] == 0
    assert manifest["skipped_empty_documents"] == 1
    assert [s["documents"] for s in manifest["sources"]] == [1] * 8 + [12, 4, 12]
    assert (corpus["out"] / "tokenizer.json").read_bytes() == corpus["tok"].read_bytes()
    assert manifest["tokenizer"]["sha256"] and not (corpus["out"] / ".work").exists()
    assert prep.verify(corpus["out"]).endswith("match their sha256 digests")


def test_output_is_the_same_with_two_workers(corpus, tmp_path):
    prep.prepare(corpus["inputs"], tmp_path / "w2", options(tokenizer=str(corpus["tok"])), workers=2)
    assert files_of(tmp_path / "w2") == files_of(corpus["out"])


def test_an_interrupted_run_resumes_and_keeps_its_finished_units(corpus, tmp_path, monkeypatch):
    real, calls = prep.tokenize_unit, []

    def crash_on_fifth(job):
        calls.append(job[2])
        if len(calls) == 5 and job[2] == 4:  # the first run dies in its fifth unit
            raise RuntimeError("killed")
        return real(job)

    monkeypatch.setattr(prep, "tokenize_unit", crash_on_fifth)
    with pytest.raises(RuntimeError, match="killed"):
        prep.prepare(corpus["inputs"], tmp_path / "out", options(tokenizer=str(corpus["tok"])))
    assert not (tmp_path / "out" / "manifest.json").exists()
    finished = sorted(p.name for p in (tmp_path / "out" / ".work").glob("unit_*.json"))
    assert finished == [f"unit_{i:06d}.json" for i in calls[:4]]
    calls.clear()
    prep.prepare(corpus["inputs"], tmp_path / "out", options(tokenizer=str(corpus["tok"])))
    assert calls[0] == 4 and not set(calls) & {0, 1, 2, 3}  # the finished units were not tokenized again
    assert files_of(tmp_path / "out") == files_of(corpus["out"])
    # Same inputs again: nothing to do; other options into the same directory: refused.
    assert prep.prepare(corpus["inputs"], tmp_path / "out", options(tokenizer=str(corpus["tok"])))
    with pytest.raises(ValueError, match="holds a different prepared dataset"):
        prep.prepare(corpus["inputs"], tmp_path / "out", options())


def test_bad_inputs_give_one_line_and_write_nothing(corpus, tmp_path, capsys):
    root = corpus["root"]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "notjson.jsonl").write_text("{oops\n")
    cases = [
        ([str(tmp_path / "empty.txt")], {}, "input .*empty.txt.*: the file is empty"),
        ([str(tmp_path / "nofield.jsonl")], {}, r"line 1: no field 'text' \(--field\); fields: body"),
        ([str(tmp_path / "notjson.jsonl")], {}, "line 1: not a JSON object"),
        ([str(root / "c.parquet")], {"column": "body"}, r"no column 'body' \(--column\); columns: text"),
        ([str(tmp_path / "missing.jsonl")], {}, "no such file or directory"),
        ([str(root / "text")], {"sft": True}, "--sft needs JSONL or parquet"),
        ([str(root / "a.jsonl")], {"tokenizer": str(tmp_path)}, "no tokenizer.json there"),
        (
            [str(root / "a.jsonl")],
            {"tokenizer": str(corpus["tok"]), "eos_token": "<eos>"},
            "not in the vocabulary",
        ),
    ]
    for inputs, extra, message in cases:
        with pytest.raises(ValueError, match=message):
            prep.prepare(inputs, tmp_path / "out", options(**extra))
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        prep.main([str(tmp_path / "nofield.jsonl"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("moe_dist.prepare: error: input ") and not (tmp_path / "out").exists()


def test_a_vocabulary_above_65536_writes_uint32_shards(corpus, tmp_path):
    tok = train_bpe(list((corpus["root"] / "text").iterdir()), tmp_path / "big.json", added=NUM_ADDED)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": f"{d[:400]} <x{65_500 + i}>"}) + "\n"
            for i, d in enumerate(corpus["docs"][:20])
        )
    )
    manifest = prep.prepare([str(docs)], tmp_path / "big", options(tokenizer=str(tok), val_fraction=0.3))
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 400 + NUM_ADDED
    tokens, _ = read_split(tmp_path / "big", "train")
    assert tokens.max() > 65_535  # ids that do not fit uint16 survived the round trip
    cfg = DataConfig(name="tokens", path=str(tmp_path / "big"))
    splits = load_tokens(cfg, vocab_size=400 + NUM_ADDED, seq_len=32)
    assert np.array_equal(splits.train.read(0, splits.train.num_tokens), tokens)
    with pytest.raises(ValueError) as err:
        load_tokens(cfg, vocab_size=65_536, seq_len=32)
    assert str(err.value).startswith("model.vocab_size=65536: smaller than the 66,000 ids of the tokenizer")


# --------------------------------------------------------------------------------------------- reading


def test_loader_reads_shards_as_one_stream_with_document_ids(corpus):
    splits = load_tokens(DataConfig(name="tokens", path=str(corpus["out"])), vocab_size=400, seq_len=64)
    tokens, starts = read_split(corpus["out"], "train")
    assert splits.train.num_tokens == len(tokens) and len(splits.train.segments) > 3
    batch = global_batch(splits.train, seed=0, step=3, batch_size=16, seq_len=64, document_mask=True)
    # Each row is a window of the stream; its document ids step up exactly where a document starts.
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 65)
    for row in range(16):
        candidates = np.flatnonzero((windows[:, :-1] == batch.inputs[row].numpy()).all(axis=1))
        assert len(candidates) >= 1
        o = int(candidates[0])
        assert np.array_equal(batch.targets[row].numpy(), tokens[o + 1 : o + 65])
        new_doc = np.isin(np.arange(o + 1, o + 64), starts)
        assert np.array_equal(np.diff(batch.doc_ids[row].numpy()), new_doc.astype(np.int64))
    assert splits.val_bytes_per_token == pytest.approx(
        corpus["manifest"]["splits"]["val"]["text_bytes"] / corpus["manifest"]["splits"]["val"]["tokens"]
    )


def test_a_corrupt_shard_or_a_mismatching_manifest_is_refused(corpus, tmp_path):
    for damage, message in (
        (
            lambda d: (d / "train_00001.bin").write_bytes((d / "train_00001.bin").read_bytes()[:-2]),
            "train_00001.bin has 5998 bytes but the manifest says 6000",
        ),
        (lambda d: (d / "val_00000.docs").unlink(), "shard file val_00000.docs is missing"),
        (
            lambda d: (d / "manifest.json").write_text(
                (d / "manifest.json").read_text().replace('"tokens": 3000', '"tokens": 3001', 1)
            ),
            "has 6000 bytes but the manifest says 6002",
        ),
        (lambda d: (d / "manifest.json").write_text("{"), "is not valid JSON"),
        (
            lambda d: (d / "manifest.json").write_text(json.dumps({"format": "moe_dist-tokens/1"})),
            "is not a complete manifest",
        ),
    ):
        shutil.rmtree(tmp_path / "copy", ignore_errors=True)
        shutil.copytree(corpus["out"], tmp_path / "copy")
        damage(tmp_path / "copy")
        with pytest.raises(ValueError, match=message):
            load_tokens(DataConfig(name="tokens", path=str(tmp_path / "copy")), vocab_size=400, seq_len=32)
    # Through the trainer: one line, before any collective or file write.
    from training_runs import run

    with pytest.raises(ValueError, match="is not a complete manifest"):
        run(
            [
                "model.vocab_size=400",
                "data.name=tokens",
                f"data.path={tmp_path / 'copy'}",
                f"trainer.out_dir={tmp_path / 'out'}",
            ]
        )
    assert not (tmp_path / "out").exists()
    (tmp_path / "copy" / "manifest.json").write_text(json.dumps({**corpus["manifest"]}))
    (tmp_path / "copy" / "train_00000.bin").write_bytes(b"\xff" * 6000)  # same size, other bytes
    with pytest.raises(ValueError, match=r"train_00000\.bin does not match its sha256"):
        prep.verify(tmp_path / "copy")


def test_mixture_weights_hold_over_many_steps(corpus, tmp_path):
    prep.prepare([str(corpus["root"] / "a.jsonl")], tmp_path / "a", options(tokenizer=str(corpus["tok"])))
    mixture = {str(corpus["out"]): 0.7, str(tmp_path / "a"): 0.3}
    splits = load_tokens(DataConfig(name="tokens", mixture=mixture), vocab_size=400, seq_len=32)
    assert isinstance(splits.train, Mixture) and splits.train.weights == pytest.approx([0.7, 0.3])
    steps, rows = 200, 16
    picks = [splits.train.source_of(step * rows + r) for step in range(steps) for r in range(rows)]
    share = picks.count(0) / len(picks)
    assert abs(share - 0.7) < 2 / len(picks)  # a low-discrepancy sequence: off by at most a couple of rows
    assert all(abs(picks[i : i + 160].count(0) / 160 - 0.7) < 0.02 for i in range(0, len(picks), 160))
    # The rows of a step come from the right datasets and do not depend on the world size.
    whole = global_batch(splits.train, seed=5, step=7, batch_size=16, seq_len=32)
    parts = [
        rank_batch(splits.train, seed=5, step=7, global_batch_size=16, seq_len=32, rank=r, world_size=4)
        for r in range(4)
    ]
    assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
    with pytest.raises(ValueError, match="tokenized differently"):
        byte_level = tmp_path / "bytes"
        prep.prepare([str(corpus["root"] / "b.jsonl")], byte_level, options())
        load_tokens(
            DataConfig(name="tokens", mixture={**mixture, str(byte_level): 1}), vocab_size=400, seq_len=32
        )


def test_sft_masks_the_loss_to_responses_and_starts_windows_at_examples(corpus, tmp_path):
    tok = tokenizers.Tokenizer.from_file(str(corpus["tok"]))
    pairs = [
        (f"Q{i}: what does {d[:60]!r} do?\n", f"A: {d[60:200]}") for i, d in enumerate(corpus["docs"][:30])
    ]
    (tmp_path / "sft.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs)
    )
    manifest = prep.prepare(
        [str(tmp_path / "sft.jsonl")], tmp_path / "sft", options(tokenizer=str(corpus["tok"]), sft=True)
    )
    assert manifest["kind"] == "sft"
    splits = load_tokens(DataConfig(name="tokens", path=str(tmp_path / "sft")), vocab_size=400, seq_len=64)
    batch = global_batch(splits.train, seed=1, step=2, batch_size=8, seq_len=64)
    prompts = {tuple(tok.encode(p, add_special_tokens=False).ids) for p, _ in pairs}
    for row in range(8):
        inputs, targets = batch.inputs[row].tolist(), batch.targets[row].tolist()
        prompt = next(p for p in prompts if tuple(inputs[: len(p)]) == p)  # the window starts at an example
        # The first targets predict the rest of the prompt: no loss; then the response is trained.
        assert all(t == IGNORE_INDEX for t in targets[: len(prompt) - 1])
        assert targets[len(prompt) - 1] != IGNORE_INDEX
    trained = (batch.targets != IGNORE_INDEX).sum().item()
    assert batch.global_targets == trained < batch.targets.numel()


def test_sft_step_loss_is_the_mean_over_trained_tokens_at_any_accumulation(corpus, tmp_path):
    """Micro-batches hold different numbers of response tokens: each one's mean is reweighted by its share,
    so the step's loss and gradient equal one micro-batch holding the whole batch."""
    from training_runs import TINY, compose_config

    from moe_dist.trainer import build_run, train_step

    pairs = [(f"Q{i}: {d[:30]}\n", f"A: {d[30 : 30 + 7 * i]}") for i, d in enumerate(corpus["docs"][:30])]
    (tmp_path / "sft.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs)
    )
    prep.prepare(
        [str(tmp_path / "sft.jsonl")], tmp_path / "sft", options(tokenizer=str(corpus["tok"]), sft=True)
    )
    results = []
    for micro in (8, 2):
        cfg = compose_config(
            [*TINY, "model.vocab_size=400", "data.name=tokens", f"data.path={tmp_path / 'sft'}",
             "data.document_mask=true", f"trainer.micro_batch_size={micro}", "trainer.grad_clip=0",
             "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0"]
        )  # fmt: skip
        run = build_run(cfg)
        batch = rank_batch(
            run.data.train,
            seed=cfg.trainer.seed,
            step=1,
            global_batch_size=8,
            seq_len=32,
            rank=0,
            world_size=1,
        )
        per_micro = [(batch.targets[i : i + 2] != IGNORE_INDEX).sum().item() for i in range(0, 8, 2)]
        result = train_step(run, 1)
        results.append((run.stats.record()["loss"], result.grad_norm.item(), per_micro))
    (loss_1, norm_1, counts), (loss_4, norm_4, _) = results
    assert len(set(counts)) > 1  # the micro-batches really differ
    assert abs(loss_1 - loss_4) < 1e-6 and abs(norm_1 - norm_4) < 1e-6 * norm_1


def test_a_batch_without_trained_targets_is_a_finite_step(corpus, tmp_path):
    """SFT windows whose prompts fill the whole window: nothing to learn from, but no NaN (0 / 0)."""
    from training_runs import TINY, compose_config

    from moe_dist.trainer import build_run, train_step

    pairs = [(f"Q{i}: {d[:600]}\n", "A: yes") for i, d in enumerate(corpus["docs"][:30]) if len(d) > 600]
    (tmp_path / "sft.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs)
    )
    prep.prepare(
        [str(tmp_path / "sft.jsonl")], tmp_path / "sft", options(tokenizer=str(corpus["tok"]), sft=True)
    )
    cfg = compose_config([*TINY, "model.vocab_size=400", "data.name=tokens", f"data.path={tmp_path / 'sft'}"])
    run = build_run(cfg)
    result = train_step(run, 1)
    assert (
        rank_batch(
            run.data.train,
            seed=cfg.trainer.seed,
            step=1,
            global_batch_size=8,
            seq_len=32,
            rank=0,
            world_size=1,
        ).global_targets
        == 0
    )
    assert result.skip_message is None and math.isfinite(result.grad_norm.item())
    assert run.stats.record()["loss"] == 0.0
