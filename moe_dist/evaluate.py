"""Evaluate a checkpoint on a dataset: loss, perplexity, bits per byte, and what every expert does.

    python -m moe_dist.evaluate runs/demo                                   # the run's own validation data
    python -m moe_dist.evaluate runs/ft data.name=tokens data.path=data/chats --max-tokens 200000
    torchrun --nproc_per_node 2 -m moe_dist.evaluate runs/demo --ep 2 --experts-of 0 2

The split (``--split val`` by default) is read in consecutive windows of model.seq_len + 1 tokens, each
predicting seq_len tokens, spread over the ranks (any world size and EP degree); ``data.*`` overrides take
the run's Hydra syntax (default: the data config the run was trained with). Bits per byte divide the
summed loss (in bits) by the UTF-8 bytes of the evaluated text (byte-level data: one per token; prepared
data: the split's bytes per token from its manifest).

Routing statistics over the same tokens, per MoE layer: the load of every expert (share of routed copies),
the router's entropy per token, and the tokens each expert receives most often (with the share of that
token's occurrences routed there). Printed as tables; written to ``<out>/evaluate.json`` and
``<out>/routing.png``.

Legend: T tokens, K experts per token, E experts, L MoE layers, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_dist.checkpoint import read_meta, resolve_checkpoint
from moe_dist.config import DataConfig, validate_layout
from moe_dist.data import Mixture, TokenStream, load_tokens
from moe_dist.model.build import load_model, model_config_from_meta
from moe_dist.model.loss import IGNORE_INDEX
from moe_dist.model.transformer import Transformer
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.mesh import Mesh, single_process_mesh

COALESCE_EVERY = 16  # batches between merges of the sparse (expert, token) counts


class RoutingRecorder:
    """Forward hooks on every router: expert counts, router entropy and (expert, token) counts per layer."""

    def __init__(self, model: Transformer, vocab_size: int):
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.vocab_size = vocab_size
        E = self.layers[0].cfg.num_experts if self.layers else 0
        device = model.head_weight.device
        self.counts_LE = torch.zeros(len(self.layers), E, dtype=torch.float64, device=device)
        self.entropy_L = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self.tokens = 0.0
        self.pairs: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]
        self.batches = 0
        self.token_ids_T: torch.Tensor | None = None  # set before every forward
        self.valid_T: torch.Tensor | None = None
        self.handles = [m.router.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(router, args, routing):
            x_TD, valid_T = args[0], self.valid_T
            logits_TE = F.linear(x_TD.float(), router.weight.float())
            if router.score_fn == "sigmoid":
                scores_TE = logits_TE.sigmoid()
                probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
            else:
                probs_TE = (logits_TE / (router.temperature if router.score_fn == "soft" else 1.0)).softmax(
                    -1
                )
            entropy_T = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1)
            self.entropy_L[index] += entropy_T[valid_T].double().sum()
            ids_TK = routing.expert_ids_TK[valid_T]
            self.counts_LE[index] += torch.bincount(
                ids_TK.reshape(-1), minlength=self.counts_LE.shape[1]
            ).double()
            codes = (ids_TK * self.vocab_size + self.token_ids_T[valid_T].unsqueeze(1)).reshape(-1)
            self.pairs[index].append(codes.unique(return_counts=True))

        return hook

    def before_batch(self, token_ids_BS: torch.Tensor, valid_BS: torch.Tensor) -> None:
        """The tokens of the next forward, and which of them count (not padding)."""
        self.token_ids_T = token_ids_BS.reshape(-1)
        self.valid_T = valid_BS.reshape(-1)
        self.tokens += float(self.valid_T.sum())
        self.batches += 1
        if self.batches % COALESCE_EVERY == 0:
            self.pairs = [[_coalesce(p)] if p else [] for p in self.pairs]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def gathered(self, mesh: Mesh) -> dict | None:
        """Sums over all ranks (every rank routed its own tokens); the result on rank 0, None elsewhere."""
        totals = torch.cat(
            [self.counts_LE.reshape(-1), self.entropy_L, self.counts_LE.new_tensor([self.tokens])]
        )
        pairs = [_coalesce(p) if p else (torch.zeros(0, dtype=torch.int64),) * 2 for p in self.pairs]
        pairs = [(codes.cpu(), counts.cpu()) for codes, counts in pairs]
        if mesh.world_group is not None:
            dist.all_reduce(totals, group=mesh.world_group)
            everyone = [None] * mesh.world_size
            dist.all_gather_object(everyone, pairs, group=mesh.world_group)
            pairs = [_coalesce([rank[i] for rank in everyone]) for i in range(len(pairs))]
        if mesh.rank != 0:
            return None
        L, E = self.counts_LE.shape
        return {
            "counts_LE": totals[: L * E].view(L, E).cpu(),
            "entropy_L": totals[L * E : L * E + L].cpu(),
            "tokens": float(totals[-1]),
            "pairs": pairs,
        }


def _coalesce(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.cat([c for c, _ in pairs])
    counts = torch.cat([n for _, n in pairs])
    unique, inverse = codes.unique(return_inverse=True)
    return unique, torch.zeros_like(unique).index_add_(0, inverse, counts)


def _windows(stream: TokenStream, *, seq_len: int, max_tokens: int | None) -> list[tuple[int, int]]:
    """(start, tokens) of the evaluated windows, each of at most seq_len + 1 tokens, up to max_tokens.

    Consecutive full windows; for supervised fine-tuning data (windows aligned to documents) one window per
    example, from its start, cut at seq_len + 1 tokens: every example is scored once, prompt first.
    """
    limit = None if max_tokens is None else max(1, max_tokens // seq_len)
    if not stream.align_to_documents:
        count = (stream.num_tokens - 1) // seq_len
        return [(i * seq_len, seq_len + 1) for i in range(count if limit is None else min(count, limit))]
    starts = [
        int(stream.starts[i]) + s for i, seg in enumerate(stream.segments) for s in seg.doc_starts.tolist()
    ]
    ends = [*starts[1:], stream.num_tokens]
    windows = [(a, min(seq_len + 1, b - a)) for a, b in zip(starts, ends) if b - a >= 2]
    return windows if limit is None else windows[:limit]


def _rows(stream: TokenStream, windows: list[tuple[int, int]], seq_len: int, *, document_mask: bool):
    """tokens [B, S+1], trained targets [B, S] and (document_mask) document ids [B, S] of ``windows``, each
    padded to seq_len + 1 tokens; padding carries no loss and no routing statistics."""
    tokens = np.zeros((len(windows), seq_len + 1), np.int64)
    trained = np.zeros((len(windows), seq_len), bool)
    doc_ids = np.zeros((len(windows), seq_len), np.int64)
    for row, (start, length) in enumerate(windows):
        tokens[row, :length] = stream.read(start, length)
        trained[row, : length - 1] = stream.loss_mask(start + 1, length - 1).astype(bool)
        if document_mask:
            doc_ids[row, stream.doc_starts(start + 1, max(length - 2, 0)) + 1] = 1
            doc_ids[row, length - 1 :] += 1  # the padding is a document of its own
    return torch.from_numpy(tokens), torch.from_numpy(trained), torch.from_numpy(doc_ids.cumsum(axis=1))


@torch.no_grad()
def evaluate_stream(
    model: Transformer,
    stream: TokenStream,
    *,
    mesh: Mesh,
    batch_size: int,
    max_tokens: int | None,
    document_mask: bool,
    recorder: RoutingRecorder | None,
) -> tuple[float, float]:
    """Collective. (summed loss in nats, predicted tokens) over the windows of ``stream``, on every rank."""
    seq_len = model.cfg.seq_len
    device = model.head_weight.device
    windows = _windows(stream, seq_len=seq_len, max_tokens=max_tokens)
    per_step = batch_size * mesh.world_size
    total = torch.zeros(2, dtype=torch.float64, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for first in range(0, len(windows), per_step):
        # Every rank runs the same number of forwards (the MoE exchange is collective): short batches are
        # padded with empty rows that count for nothing.
        mine = [windows[i] if i < len(windows) else (0, 1) for i in range(first, first + per_step)]
        mine = mine[mesh.rank * batch_size : (mesh.rank + 1) * batch_size]
        tokens_BL, trained_BS, doc_ids_BS = (
            t.to(device) for t in _rows(stream, mine, seq_len, document_mask=document_mask)
        )
        inputs, targets = tokens_BL[:, :-1], tokens_BL[:, 1:].masked_fill(~trained_BS, IGNORE_INDEX)
        if recorder is not None:
            lengths = torch.tensor([length for _, length in mine], device=device)
            recorder.before_batch(inputs, torch.arange(seq_len, device=device) < lengths.unsqueeze(1) - 1)
        with autocast:
            mean = model(inputs, targets_BS=targets, **({"doc_ids_BS": doc_ids_BS} if document_mask else {}))
        count = trained_BS.sum()
        total += torch.stack([mean.double() * count, count.double()])
    if mesh.world_group is not None:
        dist.all_reduce(total, group=mesh.world_group)
    return float(total[0]), float(total[1])


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: DataConfig,
    *,
    mesh: Mesh | None = None,
    device: torch.device | None = None,
    split: str = "val",
    batch_size: int = 8,
    max_tokens: int | None = None,
    top_tokens: int = 8,
    seq_len: int | None = None,
) -> dict | None:
    """Collective. The report (rank 0; None on the others) of ``checkpoint`` on ``split`` of ``data``, in
    windows of ``seq_len`` (default: the model's) + 1 tokens."""
    mesh = mesh or single_process_mesh()
    path = resolve_checkpoint(checkpoint)
    model, meta = load_model(path, mesh=mesh, device=device or torch.device("cpu"), seq_len=seq_len)
    cfg = model.cfg
    splits = load_tokens(data, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    target = splits.val if split == "val" else splits.train
    sources = list(zip(target.names, target.streams)) if isinstance(target, Mixture) else [("data", target)]
    recorder = RoutingRecorder(model, cfg.vocab_size) if cfg.moe.num_experts else None
    results = []
    for name, stream in sources:
        nats, tokens = evaluate_stream(
            model,
            stream,
            mesh=mesh,
            batch_size=batch_size,
            max_tokens=max_tokens,
            document_mask=data.document_mask,
            recorder=recorder,
        )
        results.append({"source": name, "loss": nats / max(tokens, 1), "tokens": int(tokens), "nats": nats})
    routing = recorder.gathered(mesh) if recorder is not None else None
    if recorder is not None:
        recorder.close()
    if mesh.rank != 0:
        return None
    nats, tokens = sum(r["nats"] for r in results), sum(r["tokens"] for r in results)
    loss = nats / max(tokens, 1)
    if isinstance(target, Mixture):  # the mixture's loss weighs each source by its sampling weight
        loss = sum(w * r["loss"] for w, r in zip(target.weights, results))
    bytes_per_token = splits.val_bytes_per_token if split == "val" else None
    if split == "train" and splits.val_bytes_per_token == 1.0:
        bytes_per_token = 1.0  # byte-level
    if any(stream.has_loss_mask for _, stream in sources):
        bytes_per_token = None  # the loss covers the responses only, the bytes the whole text
    report = {
        "checkpoint": str(path),
        "step": meta.get("step"),
        "split": split,
        "data": splits.description,
        "world_size": mesh.world_size,
        "ep": mesh.ep,
        "tokens": int(tokens),
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bytes_per_token": bytes_per_token,
        "bits_per_byte": loss / math.log(2) / bytes_per_token if bytes_per_token else None,
        "sources": [{k: v for k, v in r.items() if k != "nats"} for r in results] if len(results) > 1 else [],
        "routing": _routing_report(routing, model, splits.tokenizer_file, top_tokens=top_tokens)
        if routing
        else None,
    }
    return report


def _token_text(tokenizer_file: str | None, vocab_size: int):
    if tokenizer_file is not None:
        from moe_dist.tokenizer import HFTokenizer

        tokenizer = HFTokenizer(tokenizer_file)
        return tokenizer.token_text
    if vocab_size <= 256:
        from moe_dist.tokenizer import ByteTokenizer

        return ByteTokenizer().token_text
    return lambda token_id: f"#{token_id}"


def _routing_report(
    routing: dict, model: Transformer, tokenizer_file: str | None, *, top_tokens: int
) -> dict:
    names = [n for n, m in model.named_modules() if isinstance(m, MoELayer)]
    counts_LE, entropy_L, tokens = routing["counts_LE"], routing["entropy_L"], routing["tokens"]
    E = counts_LE.shape[1]
    V = model.cfg.vocab_size
    text = _token_text(tokenizer_file, V)
    layers = []
    for i, name in enumerate(names):
        load_E = counts_LE[i] / counts_LE[i].sum().clamp_min(1)
        codes, counts = routing["pairs"][i]
        experts, token_ids = codes // V, codes % V
        occurrences_V = torch.zeros(V, dtype=torch.float64).index_add_(0, token_ids, counts.double())
        occurrences_V /= max(
            1, model.cfg.moe.top_k if model.cfg.moe.router != "soft" else E
        )  # copies per token
        top = []
        for e in range(E):
            mine = experts == e
            order = counts[mine].argsort(descending=True)[:top_tokens]
            top.append(
                [
                    {
                        "token": text(int(t)),
                        "id": int(t),
                        "count": int(n),
                        "share": float(n / occurrences_V[t].clamp_min(1)),
                    }
                    for t, n in zip(token_ids[mine][order], counts[mine][order])
                ]
            )
        layers.append(
            {
                "layer": int(name.split(".")[1]),
                "load": load_E.tolist(),
                "entropy": float(entropy_L[i] / max(tokens, 1)),
                "normalized_entropy": float(entropy_L[i] / max(tokens, 1) / math.log(E)),
                "max_load_ratio": float(load_E.max() * E),
                "min_load_ratio": float(load_E.min() * E),
                "unused_experts": int((counts_LE[i] == 0).sum()),
                "top_tokens": top,
            }
        )
    return {"num_experts": E, "tokens": int(tokens), "layers": layers}


def format_report(report: dict, *, experts_of: list[int] | None = None) -> str:
    """The report as text tables: the summary, one line per MoE layer, the experts of chosen layers."""
    bpb = f"{report['bits_per_byte']:.4f}" if report["bits_per_byte"] is not None else "n/a"
    lines = [
        f"{report['checkpoint']} (step {report['step']}) on the {report['split']} split of {report['data']}",
        f"world={report['world_size']} ep={report['ep']} | tokens {report['tokens']:,} | loss {report['loss']:.4f} | "
        f"perplexity {report['perplexity']:.3f} | bits/byte {bpb}",
    ]
    for source in report["sources"]:
        lines.append(f"  {source['source']}: loss {source['loss']:.4f} over {source['tokens']:,} tokens")
    routing = report["routing"]
    if not routing:
        return "\n".join(lines)
    E = routing["num_experts"]
    lines += [
        "",
        f"routing over {routing['tokens']:,} tokens, {E} experts per layer (load x uniform: 1.00 = 1/{E} of copies)",
        "layer | entropy (nats) | / log E | max load | min load | unused",
    ]
    for layer in routing["layers"]:
        lines.append(
            f"{layer['layer']:>5} | {layer['entropy']:>14.3f} | {layer['normalized_entropy']:>7.3f} | "
            f"{layer['max_load_ratio']:>8.2f} | {layer['min_load_ratio']:>8.2f} | {layer['unused_experts']:>6}"
        )
    chosen = experts_of if experts_of is not None else [routing["layers"][0]["layer"]]
    for layer in routing["layers"]:
        if layer["layer"] not in chosen:
            continue
        lines += [
            "",
            f"layer {layer['layer']}: expert | load x uniform | most frequent tokens (share of the token)",
        ]
        for e, (load, top) in enumerate(zip(layer["load"], layer["top_tokens"])):
            tokens = "  ".join(f"{t['token']!r} {t['count']} ({t['share']:.0%})" for t in top)
            lines.append(f"{e:>6} | {load * E:>14.2f} | {tokens}")
    return "\n".join(lines)


def plot_routing(report: dict, path: str | Path) -> None:
    """routing.png: load per layer and expert (x uniform) and the router entropy per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["routing"]["layers"]
    E = report["routing"]["num_experts"]
    load = torch.tensor([layer["load"] for layer in layers]) * E
    fig, (heat, bars) = plt.subplots(
        1, 2, figsize=(max(8, 0.25 * E + 4), 0.4 * len(layers) + 2.5), gridspec_kw={"width_ratios": [4, 1]}
    )
    image = heat.imshow(load.numpy(), aspect="auto", cmap="viridis")
    heat.set_xlabel("expert")
    heat.set_ylabel("layer")
    heat.set_yticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
    heat.set_title(f"load per expert (x uniform), {report['tokens']:,} tokens")
    fig.colorbar(image, ax=heat)
    bars.barh(range(len(layers)), [layer["normalized_entropy"] for layer in layers])
    bars.set_yticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
    bars.invert_yaxis()
    bars.set_xlim(0, 1)
    bars.set_title("router entropy / log E")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def data_config(checkpoint: Path, overrides: list[str]) -> DataConfig:
    """``data.*`` overrides on top of the data config the run trained with (its config.yaml), else defaults."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe_dist.train import CONFIG_DIR

    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ValueError(f"{bad[0]!r}: only data.* overrides are taken (e.g. data.name=tokens data.path=DIR)")
    run_config = checkpoint.parent.parent / "config.yaml"
    base = []
    if run_config.is_file() and not any(
        o.startswith(("data.name=", "data.path=", "data.mixture=")) for o in overrides
    ):
        saved = OmegaConf.to_container(OmegaConf.load(run_config)).get("data", {})
        base = [
            f"data.{k}={json.dumps(v) if isinstance(v, str) else _override_value(v)}"
            for k, v in saved.items()
        ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[*base, *overrides]))
    return cfg.data


def _override_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {w}" for k, w in v.items()) + "}"
    return str(v)


def main(argv: list[str] | None = None) -> None:
    from moe_dist.distributed import env_world_size, init_distributed, teardown_distributed
    from moe_dist.parallel.mesh import build_mesh

    parser = argparse.ArgumentParser(prog="python -m moe_dist.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint directory (.../checkpoints/step_N) or run directory")
    parser.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.name=tokens data.path=DIR")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    parser.add_argument("--seq-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per rank per forward")
    parser.add_argument(
        "--ep", type=int, default=None, help="expert-parallel degree (default: the checkpoint's)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--top-tokens", type=int, default=8, help="tokens listed per expert")
    parser.add_argument(
        "--experts-of", type=int, nargs="*", default=None, help="layers whose experts are listed"
    )
    parser.add_argument("--out", default=None, help="directory for evaluate.json and routing.png")
    args = parser.parse_args(argv)
    try:
        path = resolve_checkpoint(args.checkpoint)
        meta = read_meta(path)
        mcfg = model_config_from_meta(meta)
        data = data_config(path, args.overrides)
        for flag, value, least in (("--batch-size", args.batch_size, 1), ("--max-tokens", args.max_tokens, 1),
                                   ("--seq-len", args.seq_len, 2)):  # fmt: skip
            if value is not None and value < least:
                raise ValueError(f"{flag}={value}: must be >= {least}")
        world = env_world_size()
        saved_ep = int(meta.get("ep", 1))
        ep = args.ep if args.ep is not None else (saved_ep if world % saved_ep == 0 else 1)
        validate_layout(world_size=world, ep=ep, num_experts=mcfg.moe.num_experts)
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        device = init_distributed(backend="nccl" if use_cuda else "gloo")
        mesh = build_mesh(ep=ep, num_experts=mcfg.moe.num_experts)
        report = evaluate_checkpoint(
            path,
            data,
            mesh=mesh,
            device=device,
            split=args.split,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            top_tokens=args.top_tokens,
            seq_len=args.seq_len,
        )
    except ValueError as err:
        print(f"moe_dist.evaluate: error: {err}", file=sys.stderr)
        sys.exit(2)
    if report is not None:
        out = Path(args.out) if args.out else path.parent.parent / "eval" / f"{path.name}_{args.split}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluate.json").write_text(json.dumps(report, indent=1) + "\n")
        print(format_report(report, experts_of=args.experts_of))
        if report["routing"]:
            plot_routing(report, out / "routing.png")
        print(
            f"\nwritten: {out / 'evaluate.json'}" + (f", {out / 'routing.png'}" if report["routing"] else "")
        )
    teardown_distributed()


if __name__ == "__main__":
    main()
