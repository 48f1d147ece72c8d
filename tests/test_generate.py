"""Generation: the KV cache reproduces full recomputation, and EP inference at world 2 gives world 1's tokens."""

from __future__ import annotations

import pytest
import torch
from harness import spawn_ranks
from training_runs import run

from moe_dist.generate import generate, main
from moe_dist.model.build import load_model
from moe_dist.parallel.mesh import single_process_mesh

PROMPT = list(b"def ")
NEW_TOKENS = 40  # past the tiny model's 32-position window: the window restarts once


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("gen") / "run"
    return run(["trainer.max_steps=4", f"trainer.out_dir={out}"])


def world1_model(checkpoint: str):
    return load_model(checkpoint, mesh=single_process_mesh(), device=torch.device("cpu"))[0]


def ep2_jobs(rank: int, world_size: int, checkpoint: str) -> dict:
    from moe_dist.parallel.mesh import build_mesh

    mesh = build_mesh(ep=2, num_experts=4)
    model, _ = load_model(checkpoint, mesh=mesh, device=torch.device("cpu"))
    assert model.layers[0].ffn.experts.num_local_experts == 2
    return {
        "greedy": generate(model, PROMPT, max_new_tokens=NEW_TOKENS, mesh=mesh),
        "sampled": generate(
            model, PROMPT, max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=8, seed=5, mesh=mesh
        ),
    }


def test_cached_forward_equals_full_forward(checkpoint):
    model = world1_model(checkpoint)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        pieces = [model(x[:, :9], cache=cache), model(x[:, 9:20], cache=cache, start_pos=9)]
        pieces += [model(x[:, i : i + 1], cache=cache, start_pos=i) for i in range(20, 32)]
        with pytest.raises(ValueError, match=r"past the context of model\.seq_len=32"):
            model(x[:, :1], cache=cache, start_pos=32)
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5


def test_greedy_is_deterministic_and_the_cache_changes_nothing(checkpoint):
    model = world1_model(checkpoint)
    cached = generate(model, PROMPT, max_new_tokens=NEW_TOKENS)
    assert len(cached) == NEW_TOKENS and all(0 <= t < 256 for t in cached)
    assert generate(model, PROMPT, max_new_tokens=NEW_TOKENS) == cached
    assert generate(model, PROMPT, max_new_tokens=NEW_TOKENS, use_cache=False) == cached
    sampled = generate(model, PROMPT, max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=8, seed=5)
    assert generate(model, PROMPT, max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=8, seed=5) == sampled
    assert sampled != cached  # a draw from the top 8 is not the argmax every time


def test_ep2_generation_equals_world1(checkpoint):
    model = world1_model(checkpoint)
    greedy = generate(model, PROMPT, max_new_tokens=NEW_TOKENS)
    sampled = generate(model, PROMPT, max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=8, seed=5)
    for rank, result in enumerate(spawn_ranks(2, ep2_jobs, checkpoint)):
        assert result["greedy"] == greedy, f"rank {rank}"
        assert result["sampled"] == sampled, f"rank {rank}"


def test_cli_prints_prompt_and_completion(checkpoint, capsys):
    main([checkpoint, "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"])
    greedy = generate(world1_model(checkpoint), PROMPT, max_new_tokens=12)
    out = capsys.readouterr()
    assert out.out == "def " + bytes(greedy).decode("utf-8", errors="replace") + "\n"
    assert "12 tokens in" in out.err

    with pytest.raises(SystemExit) as exit_info:
        main([checkpoint, "--ep", "3", "--max-new-tokens", "1"])
    assert exit_info.value.code == 2
    assert "parallel.ep=3" in capsys.readouterr().err
