"""Hugging Face interop: export → from_pretrained gives moe_dist's logits, import gives transformers' logits.

One spawn of two gloo ranks covers the EP cases: export of an ep-2 checkpoint equals export of the same
weights loaded at ep 1, and a world-2/ep-2 model initialised from a Mixtral directory matches transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import spawn_ranks
from safetensors import safe_open
from safetensors.torch import save_file
from training_runs import run

from moe_dist.config import ModelConfig, MoEConfig
from moe_dist.export import export_checkpoint
from moe_dist.hf import export_model, hf_model_type, init_from_hf, model_config_from_hf
from moe_dist.model.transformer import Transformer
from moe_dist.parallel.apply import parallelize_moe
from moe_dist.parallel.mesh import single_process_mesh

TOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
MIXTRAL_RUN = ["model.moe.router=softmax", "model.moe.norm_topk=true", "model.moe.num_shared_experts=0"]


def hf_lib():
    """transformers, imported on first use (the spawned ranks never need it)."""
    return pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits_of_hf(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    model, info = hf_lib().AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model(x).logits


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory: one model.safetensors, or the files its index names."""
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out = {}
    for file in files:
        with safe_open(path / file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def with_overrides(overrides: dict, base: ModelConfig | None = None) -> ModelConfig:
    cfg = base or ModelConfig(seq_len=32)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")[1:]
        target = cfg
        for name in parents:
            target = getattr(target, name)
        setattr(target, leaf, value)
    return cfg


def tiny_mixtral(path: Path, *, seed: int = 0, **config) -> None:
    """A random Mixtral with non-trivial norms, saved as save_pretrained writes it."""
    torch.manual_seed(seed)
    transformers = hf_lib()
    cfg = transformers.MixtralConfig(
        **{
            "vocab_size": 256,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "initializer_range": 0.2,  # sharp routing: a wrong expert layout could not hide
            **config,
        }
    )
    model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)


def random_model(moe: dict, *, seed: int = 0) -> Transformer:
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=2, seq_len=32, ffn_hidden=48)
    cfg.moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 32, **moe})
    model = Transformer(cfg)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen) if "norm" in name else p * 8)
        for layer in model.moe_layers():
            layer.router.expert_bias.copy_(0.3 * torch.randn(layer.cfg.num_experts, generator=gen))
    return model.eval()


# --------------------------------------------------------------------------------------------- world 2


def world2_jobs(rank: int, world_size: int, root: str, mixtral_dir: str) -> dict:
    from moe_dist.model.build import load_model
    from moe_dist.parallel.mesh import build_mesh

    run(
        [
            *MIXTRAL_RUN,
            "parallel.ep=2",
            "trainer.max_steps=2",
            "trainer.micro_batch_size=4",
            f"trainer.out_dir={root}/ep2",
        ]
    )
    # The ep-2 checkpoint loaded with unsharded experts (world 2, ep 1), exported by rank 0.
    model, _ = load_model(f"{root}/ep2", mesh=build_mesh(ep=1, num_experts=4), device=torch.device("cpu"))
    if rank == 0:
        export_model(model, f"{root}/hf_from_ep1")

    # A Mixtral directory loaded into a world-2/ep-2 model: each rank reads its own two experts.
    mesh = build_mesh(ep=2, num_experts=4)
    cfg = with_overrides(model_config_from_hf(mixtral_dir))
    imported = parallelize_moe(Transformer(cfg), mesh)
    imported.init_weights(0)
    init_from_hf(imported, mixtral_dir, mesh)
    with torch.no_grad():
        logits = imported.eval()(tokens(seed=rank))
    return {"logits": logits, "experts": imported.layers[0].ffn.experts.w_down.detach().clone()}


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_world2")
    tiny_mixtral(root / "mixtral")
    results = spawn_ranks(2, world2_jobs, str(root), str(root / "mixtral"))
    return {"root": root, "results": results}


def test_export_of_an_ep2_checkpoint_equals_the_same_weights_at_ep1(world2, tmp_path):
    root = world2["root"]
    meta = json.loads(next((root / "ep2" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert (meta["world_size"], meta["ep"]) == (2, 2)
    model_type, _ = export_checkpoint(root / "ep2", tmp_path / "hf")
    assert model_type == "mixtral"
    ours, reference = tensors_of(tmp_path / "hf"), tensors_of(root / "hf_from_ep1")
    assert ours.keys() == reference.keys()
    assert len([k for k in ours if ".experts." in k]) == 2 * 4 * 3  # layers x experts x (w1, w3, w2)
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
    x = tokens()
    from moe_dist.model.build import load_model

    model, _ = load_model(root / "ep2", mesh=single_process_mesh(), device=torch.device("cpu"))
    with torch.no_grad():
        assert (model(x) - logits_of_hf(tmp_path / "hf", x)).abs().max() < TOL


def test_import_at_ep2_matches_transformers(world2):
    mixtral = world2["root"] / "mixtral"
    for rank, result in enumerate(world2["results"]):
        reference = logits_of_hf(mixtral, tokens(seed=rank))
        assert (result["logits"] - reference).abs().max() < TOL
    # Each rank holds its own two experts of layer 0: w2 of expert e is w_down[e].T.
    with safe_open(mixtral / "model.safetensors", "pt") as f:
        for rank, result in enumerate(world2["results"]):
            for local in range(2):
                w2 = f.get_tensor(f"model.layers.0.block_sparse_moe.experts.{2 * rank + local}.w2.weight")
                assert torch.equal(result["experts"][local], w2.t())


# --------------------------------------------------------------------------------------------- world 1


def test_export_streams_one_layer_at_a_time_into_indexed_shards(tmp_path, monkeypatch):
    """The checkpoint is read one group of tensors at a time (a layer, or embeddings + final norm + head), never
    the whole model, and each group lands in a file of its own, listed in model.safetensors.index.json."""
    import moe_dist.export as export

    run_dir = run(
        [*MIXTRAL_RUN, "model.n_layers=3", "trainer.max_steps=1", f"trainer.out_dir={tmp_path}/run"]
    )
    reads, read_tensors = [], export.read_tensors

    def recording(reader, names):
        tensors = read_tensors(reader, names)
        reads.append({name: t.numel() * t.element_size() for name, t in tensors.items()})
        return tensors

    monkeypatch.setattr(export, "read_tensors", recording)
    export_checkpoint(run_dir, tmp_path / "hf")
    groups = [{export._group_of(name.removeprefix("model.")) for name in read} for read in reads]
    assert groups == [{"layers.0"}, {"layers.1"}, {"layers.2"}, {"rest"}]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    for file in files:
        with safe_open(tmp_path / "hf" / file, "pt") as f:
            assert len({export._group_of(k) for k in f.keys()}) == 1, file  # noqa: SIM118
    exported = tensors_of(tmp_path / "hf")
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in exported.values())
    from moe_dist.model.build import load_model

    model, _ = load_model(run_dir, mesh=single_process_mesh(), device=torch.device("cpu"))
    x = tokens()
    with torch.no_grad():
        assert (model(x) - logits_of_hf(tmp_path / "hf", x)).abs().max() < TOL


def test_export_of_a_trained_checkpoint_loads_in_transformers_with_equal_logits(tmp_path):
    run_dir = run([*MIXTRAL_RUN, "trainer.max_steps=2", f"trainer.out_dir={tmp_path}/run"])
    model_type, ckpt = export_checkpoint(run_dir, tmp_path / "hf")
    assert model_type == "mixtral" and ckpt.name == "step_2"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    from moe_dist.model.build import load_model

    model, _ = load_model(ckpt, mesh=single_process_mesh(), device=torch.device("cpu"))
    x = tokens(batch=3)
    with torch.no_grad():
        diff = (model(x) - logits_of_hf(tmp_path / "hf", x)).abs().max().item()
    assert diff < TOL


@pytest.mark.parametrize(
    ("moe", "model_type"),
    [
        ({"router": "soft", "temperature": 0.5}, "mixtral"),
        ({"num_shared_experts": 2}, "granitemoeshared"),
        ({"norm_topk": False}, "qwen2_moe"),
        ({"every_n_layers": 2}, "qwen2_moe"),
        ({"router": "sigmoid", "num_shared_experts": 1}, "glm4_moe"),
        ({"router": "sigmoid", "norm_topk": False}, "glm4_moe"),
        ({"num_experts": 0}, "llama"),
    ],
)
def test_exact_counterparts_give_equal_logits(moe, model_type, tmp_path):
    model = random_model(moe)
    assert export_model(model, tmp_path) == model_type
    x = tokens()
    with torch.no_grad():
        assert (model(x) - logits_of_hf(tmp_path, x)).abs().max() < TOL


def test_sigmoid_selection_bias_is_exported(tmp_path):
    """The GLM-4-MoE parity above depends on e_score_correction_bias: without it the logits differ."""
    model = random_model({"router": "sigmoid"})
    export_model(model, tmp_path)
    for layer in model.moe_layers():
        layer.router.expert_bias.zero_()
    x = tokens()
    with torch.no_grad():
        assert (model(x) - logits_of_hf(tmp_path, x)).abs().max() > 1e-2


def test_import_matches_transformers_and_round_trips(tmp_path):
    tiny_mixtral(tmp_path / "mixtral")
    overrides = model_config_from_hf(tmp_path / "mixtral")
    assert overrides["model.moe.num_experts"] == 4 and overrides["model.rope_theta"] == 10000.0
    model = parallelize_moe(Transformer(with_overrides(overrides)), single_process_mesh())
    model.init_weights(0)
    init_from_hf(model, tmp_path / "mixtral", single_process_mesh())
    x = tokens()
    with torch.no_grad():
        assert (model.eval()(x) - logits_of_hf(tmp_path / "mixtral", x)).abs().max() < TOL

    # moe_dist → HF → moe_dist gives back every tensor bitwise.
    export_model(model, tmp_path / "again")
    copy = Transformer(with_overrides(overrides))
    copy.init_weights(1)
    init_from_hf(copy, tmp_path / "again", single_process_mesh())
    for (name, a), b in zip(model.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(a, b), name


def test_import_reads_the_fused_transformers5_layout(tmp_path):
    tiny_mixtral(tmp_path / "mixtral", seed=3)
    hf = hf_lib().AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral")
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "mixtral" / "config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "fused" / "model.safetensors"
    )
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors_of(tmp_path / "fused")
    model = Transformer(with_overrides(model_config_from_hf(tmp_path / "fused")))
    init_from_hf(model, tmp_path / "fused", single_process_mesh())
    x = tokens()
    with torch.no_grad():
        assert (model.eval()(x) - hf(x).logits).abs().max() < TOL


def test_refusals_name_the_feature():
    cases = [
        (
            {"num_shared_experts": 1, "every_n_layers": 2},
            "model.moe.num_shared_experts=1 with model.moe.every_n",
        ),
        ({"num_shared_experts": 1, "norm_topk": False}, "gates its shared expert with a sigmoid"),
        ({"router": "sigmoid", "every_n_layers": 2}, "first_k_dense_replace"),
    ]
    for moe, message in cases:
        cfg = ModelConfig(moe=MoEConfig(**moe))
        with pytest.raises(ValueError, match="cannot export to Hugging Face exactly") as err:
            hf_model_type(cfg)
        assert message in str(err.value)


def test_import_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError) as err:
        model_config_from_hf(missing)
    assert (
        str(err.value)
        == f"model.init_from={str(missing)!r}: not a local directory; hub downloads are never attempted"
    )
    with pytest.raises(ValueError, match="not a local directory; hub downloads are never attempted"):
        init_from_hf(Transformer(ModelConfig()), "mistralai/Mixtral-8x7B-v0.1", single_process_mesh())

    tiny_mixtral(tmp_path / "gqa", num_key_value_heads=1)
    with pytest.raises(ValueError, match="num_key_value_heads=1 != num_attention_heads=2: grouped-query"):
        model_config_from_hf(tmp_path / "gqa")

    tiny_mixtral(tmp_path / "mixtral")
    wrong = with_overrides(model_config_from_hf(tmp_path / "mixtral"))
    wrong.dim, wrong.moe.top_k = 64, 3
    with pytest.raises(ValueError) as err:
        init_from_hf(Transformer(wrong), tmp_path / "mixtral", single_process_mesh())
    assert "model.dim=64 but the Hugging Face model has 32" in str(err.value)
    assert "model.moe.top_k=3 but the Hugging Face model has 2" in str(err.value)
