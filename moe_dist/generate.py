"""Sampling from a trained checkpoint with a KV cache, on one process or expert-parallel under torchrun.

    python -m moe_dist.generate runs/demo/checkpoints/step_400 --prompt "def " --max-new-tokens 200 \\
        --temperature 0.8 --top-k 40 --seed 0
    torchrun --nproc_per_node 2 -m moe_dist.generate runs/demo --ep 2 --prompt "def " --temperature 0

Tokens are bytes: the prompt is encoded as UTF-8 and the output decoded with errors="replace". Under
torchrun every rank runs the same decode loop (the MoE layers exchange tokens through the same dispatcher
as in training); rank 0 samples each token and broadcasts it, so all ranks extend the same sequence.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_dist.checkpoint import read_meta, resolve_checkpoint
from moe_dist.config import validate_layout
from moe_dist.model.build import load_model, model_config_from_meta
from moe_dist.model.transformer import Transformer
from moe_dist.parallel.mesh import Mesh, single_process_mesh


def sample_token(
    logits_V: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator | None
) -> int:
    """Greedy when temperature == 0; else a draw from softmax(logits / temperature) over the top_k (0 = all)."""
    logits_V = logits_V.float().cpu()
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if 0 < top_k < logits_V.numel():
        kth = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    return int(torch.multinomial(logits_V.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    use_cache: bool = True,
    mesh: Mesh | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Collective under EP (every rank of ``mesh`` calls it with the same prompt). Returns the new tokens.

    The model sees at most model.seq_len tokens: a prompt longer than that keeps its last seq_len tokens,
    and when the sequence outgrows the window it restarts from its newest seq_len // 2 tokens (the cache
    is rebuilt). ``use_cache=False`` recomputes the whole window every step: the same tokens, slower.
    """
    if not prompt:
        raise ValueError("prompt: must hold at least one token")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    mesh = mesh or single_process_mesh()
    device = model.output.weight.device
    seq_len = model.cfg.seq_len
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens = list(prompt)
    window_start = max(0, len(tokens) - seq_len)
    cache, cached = None, 0  # tokens[window_start : window_start + cached] are in the cache
    for _ in range(max_new_tokens):
        if len(tokens) - window_start > seq_len:
            window_start, cache = len(tokens) - max(1, seq_len // 2), None
        with autocast:
            if not use_cache:
                logits = model(torch.tensor([tokens[window_start:]], device=device))
            elif cache is None:
                cache = model.new_cache()
                cached = len(tokens) - window_start
                logits = model(torch.tensor([tokens[window_start:]], device=device), cache=cache)
            else:
                logits = model(torch.tensor([tokens[-1:]], device=device), cache=cache, start_pos=cached)
                cached += 1
        next_token = torch.tensor(
            [sample_token(logits[0, -1], temperature=temperature, top_k=top_k, generator=generator)],
            device=device,
        )
        if mesh.world_group is not None:  # rank 0's draw: ranks may differ in the last bits of their logits
            dist.broadcast(next_token, src=0, group=mesh.world_group)
        tokens.append(int(next_token))
        if on_token is not None:
            on_token(tokens[-1])
    return tokens[len(prompt) :]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moe_dist.generate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint directory (.../checkpoints/step_N) or run directory")
    parser.add_argument("--prompt", default="", help="text; encoded as UTF-8 bytes")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: nondeterministic)")
    parser.add_argument(
        "--ep", type=int, default=None, help="expert-parallel degree (default: the checkpoint's)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole window every token")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads per process (torch's default when omitted)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from moe_dist.distributed import choose_device, env_world_size, init_distributed, teardown_distributed
    from moe_dist.parallel.mesh import build_mesh

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        path = resolve_checkpoint(args.checkpoint)
        meta = read_meta(path)
        mcfg = model_config_from_meta(meta)
        if mcfg.vocab_size < 256:
            raise ValueError(
                f"model.vocab_size={mcfg.vocab_size}: byte-level prompts need a vocabulary of 256"
            )
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens={args.max_new_tokens}: must be >= 0")
        world = env_world_size()
        saved_ep = int(meta.get("ep", 1))
        ep = args.ep if args.ep is not None else (saved_ep if world % saved_ep == 0 else 1)
        validate_layout(world_size=world, ep=ep, num_experts=mcfg.moe.num_experts)
        prompt = list(args.prompt.encode("utf-8")) or [ord("\n")]
        device_type, backend = choose_device(device=args.device)
        device = init_distributed(device_type=device_type, backend=backend)
        mesh = build_mesh(ep=ep, num_experts=mcfg.moe.num_experts)
        model, _ = load_model(path, mesh=mesh, device=device)
    except ValueError as err:
        print(f"moe_dist.generate: error: {err}", file=sys.stderr)
        sys.exit(2)

    is_main = mesh.rank == 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def stream(token: int) -> None:
        if is_main:
            sys.stdout.write(decoder.decode(bytes([token])))
            sys.stdout.flush()

    if is_main:
        sys.stdout.write(args.prompt)
    start = time.perf_counter()
    new = generate(
        model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        use_cache=not args.no_cache,
        mesh=mesh,
        on_token=stream,
    )
    elapsed = time.perf_counter() - start
    if is_main:
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        print(
            f"[{len(new)} tokens in {elapsed:.2f}s, {len(new) / max(elapsed, 1e-9):.1f} tok/s | "
            f"world={mesh.world_size} ep={mesh.ep} device={device} | {path}]",
            file=sys.stderr,
        )
    teardown_distributed()


if __name__ == "__main__":
    main()
