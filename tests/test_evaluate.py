"""python -m moe_dist.evaluate: loss, perplexity and bits per byte equal to a by-hand computation, routing
statistics equal to counting every routing decision, and the same report at world 2 / EP 2.

The end-to-end case prepares a corpus with a locally trained tokenizer whose vocabulary is above 65,536 ids
(uint32 shards), trains on it and evaluates the checkpoint.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from harness import spawn_ranks
from test_prepare import NUM_ADDED, options, train_bpe
from training_runs import run

import moe_dist.prepare as prep
from moe_dist.config import DataConfig
from moe_dist.data import load_tokens
from moe_dist.evaluate import evaluate_checkpoint, format_report, main
from moe_dist.model.build import load_model
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.mesh import single_process_mesh

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("tokenizers")
VOCAB = 400 + NUM_ADDED


def world2_jobs(rank: int, world_size: int, root: str) -> list:
    from moe_dist.parallel.mesh import build_mesh

    data = DataConfig(name="tokens", path=f"{root}/data", document_mask=True)
    reports = []
    for ep in (2, 1):
        mesh = build_mesh(ep=ep, num_experts=4)
        reports.append(evaluate_checkpoint(f"{root}/run", data, mesh=mesh, batch_size=3, max_tokens=2000))
    return reports


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Prepared (uint32) → trained 3 steps with document masking → evaluated at world 1 and world 2."""
    root = tmp_path_factory.mktemp("evaluate")
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[d-m]*.py"))[:30]
    tok = train_bpe(stdlib[:10], root / "tokenizer.json", added=NUM_ADDED)
    lines = [json.dumps({"text": f"{p.read_text()[:1500]} <x{65_500 + i}>"}) for i, p in enumerate(stdlib)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    manifest = prep.prepare(
        [str(root / "docs.jsonl")], root / "data", options(tokenizer=str(tok), val_fraction=0.3)
    )
    assert manifest["dtype"] == "uint32"
    data = ["data.name=tokens", f"data.path={root / 'data'}", "data.document_mask=true"]
    run(
        [
            *data,
            f"model.vocab_size={VOCAB}",
            "model.tie_embeddings=true",
            "trainer.max_steps=3",
            f"trainer.out_dir={root}/run",
        ]
    )
    cfg = DataConfig(name="tokens", path=str(root / "data"), document_mask=True)
    report = evaluate_checkpoint(root / "run", cfg, batch_size=4, max_tokens=2000)
    return {"root": root, "report": report, "world2": spawn_ranks(2, world2_jobs, str(root)), "cfg": cfg}


def by_hand(trained: dict) -> dict:
    """Every window through the model (no chunked loss, no batching), every routing decision counted."""
    model, _ = load_model(trained["root"] / "run", mesh=single_process_mesh(), device=torch.device("cpu"))
    splits = load_tokens(trained["cfg"], vocab_size=VOCAB, seq_len=model.cfg.seq_len)
    S = model.cfg.seq_len
    decisions = {i: [] for i, m in enumerate(m for m in model.modules() if isinstance(m, MoELayer))}
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for i, layer in enumerate(layers):
        layer.router.register_forward_hook(lambda mod, a, out, i=i: decisions[i].append(out.expert_ids_TK))
    nats, tokens, inputs_seen = 0.0, 0, []
    for w in range(2000 // S):
        window = torch.from_numpy(splits.val.read(w * S, S + 1)).unsqueeze(0)
        starts = splits.val.doc_starts(w * S + 1, S - 1) + 1
        doc_ids = torch.zeros(1, S, dtype=torch.int64)
        doc_ids[0, torch.as_tensor(starts)] = 1
        with torch.no_grad():
            logits = model.eval()(window[:, :-1], doc_ids_BS=doc_ids.cumsum(1))
        nats += F.cross_entropy(logits[0].double(), window[0, 1:], reduction="sum").item()
        tokens += S
        inputs_seen.append(window[0, :-1])
    return {
        "nats": nats,
        "tokens": tokens,
        "decisions": decisions,
        "inputs": torch.cat(inputs_seen),
        "splits": splits,
    }


def test_loss_perplexity_and_bits_per_byte_equal_the_by_hand_values(trained):
    report, reference = trained["report"], by_hand(trained)
    loss = reference["nats"] / reference["tokens"]
    assert report["tokens"] == reference["tokens"]
    assert abs(report["loss"] - loss) < 1e-5
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    bytes_per_token = reference["splits"].val_bytes_per_token
    assert report["bits_per_byte"] == pytest.approx(report["loss"] / math.log(2) / bytes_per_token)


def test_routing_statistics_count_every_decision(trained):
    report, reference = trained["report"], by_hand(trained)
    inputs = reference["inputs"]
    for i, layer in enumerate(report["routing"]["layers"]):
        ids_TK = torch.cat(reference["decisions"][i])
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=4).double()
        assert layer["load"] == pytest.approx((counts_E / counts_E.sum()).tolist(), abs=1e-12)
        for e, top in enumerate(layer["top_tokens"]):
            routed = inputs[(ids_TK == e).any(dim=1)]
            for entry in top:
                assert entry["count"] == int((routed == entry["id"]).sum())
                assert entry["share"] == pytest.approx(entry["count"] / int((inputs == entry["id"]).sum()))
            assert [t["count"] for t in top] == sorted(torch.bincount(routed).tolist(), reverse=True)[
                : len(top)
            ]
        assert 0 < layer["normalized_entropy"] <= 1


def test_the_same_report_at_world_2_with_ep_2_and_ep_1(trained):
    ours = trained["report"]
    for rank, reports in enumerate(trained["world2"]):
        for report in reports:
            if rank:
                assert report is None  # rank 0 reports
                continue
            assert report["tokens"] == ours["tokens"] and abs(report["loss"] - ours["loss"]) < 1e-5
            for a, b in zip(report["routing"]["layers"], ours["routing"]["layers"]):
                assert a["load"] == pytest.approx(b["load"], abs=1e-12)
                assert a["top_tokens"] == b["top_tokens"]


def test_cli_prints_tables_and_writes_json_and_png(trained, tmp_path, capsys):
    main([str(trained["root"] / "run"), "data.name=tokens", f"data.path={trained['root'] / 'data'}",
          "--max-tokens", "500", "--out", str(tmp_path), "--top-tokens", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert "perplexity" in out and "bits/byte" in out and "layer 0: expert" in out
    assert json.loads((tmp_path / "evaluate.json").read_text())["tokens"] == 480
    assert (tmp_path / "routing.png").stat().st_size > 1000
    assert format_report(trained["report"]).splitlines()[0] == out.splitlines()[0]
    with pytest.raises(SystemExit) as err:
        main([str(trained["root"] / "run"), "trainer.lr=1"])
    assert err.value.code == 2
    assert "only data.* overrides are taken" in capsys.readouterr().err


def test_sft_data_is_scored_once_per_example_from_its_start(trained, tmp_path):
    docs = [p.read_text()[:400] for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[n-r]*.py"))[:20]]
    pairs = [{"prompt": f"Q: {d[:40]}\n", "response": d[40:]} for d in docs]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tok = str(trained["root"] / "tokenizer.json")
    prep.prepare(
        [str(tmp_path / "sft.jsonl")], tmp_path / "sft", options(tokenizer=tok, sft=True, val_fraction=0.5)
    )
    cfg = DataConfig(name="tokens", path=str(tmp_path / "sft"))
    report = evaluate_checkpoint(trained["root"] / "run", cfg, batch_size=4)
    splits = load_tokens(cfg, vocab_size=VOCAB, seq_len=32)
    starts = [int(s) for s in splits.val.segments[0].doc_starts]
    ends = [*starts[1:], splits.val.num_tokens]
    # Each example once, from its start: its trained targets among its first 32 predictions.
    expected = sum(int(splits.val.loss_mask(a + 1, min(32, b - a - 1)).sum()) for a, b in zip(starts, ends))
    assert report["tokens"] == expected > 0 and report["bits_per_byte"] is None
