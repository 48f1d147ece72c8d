"""Typed configuration schemas (registered with Hydra's ConfigStore) and their validation.

Every user-facing mistake is a ``ValueError`` naming the config key and the offending value, raised
before any process group is created or any file is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ENGINES = ("native", "deepspeed", "fsdp")
ROUTERS = ("softmax", "sigmoid", "soft")
BACKENDS = ("auto", "nccl", "gloo")
DATASETS = ("stdlib", "text", "tokens")
WANDB_MODES = ("disabled", "offline", "online")
GROUPED_MM_MODES = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16", "fp64")  # see moe_dist/precision.py
AUX_LOSS_SCOPES = ("micro_step", "sequence")
ACTIVATION_CHECKPOINTING = ("none", "full", "moe", "every_n:<n>")
QK_NORMS = ("none", "head", "full")
FREEZE_GROUPS = ("router", "embeddings", "dense", "experts")


@dataclass
class MoEConfig:
    num_experts: int = 8  # routed experts per MoE layer (0 = dense FFN everywhere)
    top_k: int = 2  # experts chosen per token
    expert_hidden: int = 256  # hidden width F of each SwiGLU expert
    capacity_factor: float | None = None  # None = dropless; else capacity = ceil(cf * T * k / E) per rank
    router: str = "softmax"  # "softmax" (GShard/Mixtral), "sigmoid" (DeepSeek-V3) or "soft" (dense mixture)
    temperature: float = 1.0  # "soft" router: every expert weighted by softmax(logits / temperature)
    norm_topk: bool = True  # renormalise the k selected gate weights to sum to 1 (Mixtral)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight (global-batch statistics)
    z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)
    recv_budget: int | None = None  # max rows one rank receives per exchange round (None: one round)
    num_shared_experts: int = 0  # always-on experts of width expert_hidden beside the routed ones
    noisy_gate: bool = False  # Shazeer-2017 learned Gaussian noise on router logits while training
    bias_update_rate: float = 0.001  # aux-loss-free bias step per optimizer step (sigmoid router only)
    every_n_layers: int = 1  # MoE FFN in every n-th block, dense FFN in the others
    grouped_mm: str = "auto"  # "auto": grouped_mm on CUDA when shapes allow, loop on CPU; "on"; "off" (loop)
    aux_loss_scope: str = "micro_step"  # balance loss per micro-step (Switch) or "sequence" (DeepSeek-V3)
    overlap_chunks: int = 1  # ep > 1: token chunks whose all-to-alls overlap the experts of the chunk before


@dataclass
class ModelConfig:
    vocab_size: int = 256  # byte-level by default
    dim: int = 128  # model width D
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128  # maximum (and training) sequence length
    ffn_hidden: int = 512  # hidden width of the dense SwiGLU FFN (non-MoE blocks)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    init_from: str | None = None  # start from: a moe_dist checkpoint or run dir, or a local Hugging Face dir
    moe: MoEConfig = field(default_factory=MoEConfig)
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    head_dim: int | None = None  # per-head width; None = dim // n_heads
    qk_norm: str = (
        "none"  # RMSNorm of queries and keys: "none", "head" (over head_dim: Qwen3), "full" (OLMoE)
    )
    tie_embeddings: bool = False  # the LM head reuses the token embedding matrix
    loss_chunk_tokens: int | None = None  # cross-entropy chunk; None = auto (<= 2^26 logits), 0 = unchunked


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel degree; world_size / ep ranks replicate each expert shard (EDP)
    backend: str = "auto"  # "auto" = nccl when CUDA is available, else gloo
    timeout_s: float | None = None  # collective timeout; None = 600 s on NCCL, 300 s on gloo
    allow_gloo_on_cuda: bool = False  # accept backend=gloo on a CUDA run (GPU tensors through gloo)


@dataclass
class EngineConfig:
    name: str = "native"  # "native" (AdamW + gradient sync), "deepspeed" (ZeRO), "fsdp" (FSDP2, all sharded)
    zero_stage: int = 0  # deepspeed: 0, 1 (optimizer state sharded) or 2 (+ gradients sharded)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config keys, passed through
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward, regather in backward
    prefetch: int = 0  # fsdp: all-gathers issued this many units ahead explicitly (0: FSDP2's own)
    overlap_grad_sync: bool = True  # native: all-reduce gradient buckets while the last backward still runs
    grad_bucket_mb: float = 25.0  # native: gradient all-reduce bucket cap (MiB of fp32); at least 4 buckets


@dataclass
class DataConfig:
    name: str = "stdlib"  # "stdlib" (this Python's standard-library sources), "text", "tokens"
    path: str | None = None  # file, directory or glob (text); a uint16 .bin file (tokens)
    val_fraction: float = 0.05  # share of files (stdlib/text) or tokens (flat token file) held out for eval
    mixture: Any = None  # {prepared dataset dir: weight, ...} sampled by weight (data.name=tokens)
    document_mask: bool = False  # attention stops at document boundaries; positions restart per document


@dataclass
class TrainerConfig:
    max_steps: int = 200  # optimizer steps; also the length of the cosine schedule
    stop_at_step: int | None = None  # end early (with a checkpoint) as a preemption would; schedule unchanged
    global_batch_size: int = 16  # sequences per optimizer step over all ranks
    micro_batch_size: int = 8  # sequences per rank per forward; accumulation fills the rest
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # clip on the exact global norm; 0 disables
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic eval
    eval_batches: int = 4
    ckpt_every: int = 100  # 0 disables periodic checkpoints; the last step is always saved
    keep_checkpoints: int = 3  # newest complete checkpoints kept
    max_nonfinite_skips: int = 3  # steps with a non-finite gradient skipped before the run stops
    collapse_warn_steps: int = 50  # warn when an expert gets no tokens this many steps in a row (0 = off)
    out_dir: str | None = None  # run directory; default: Hydra's output directory
    resume: str = "auto"  # "auto" (newest complete checkpoint in out_dir), "none", or a checkpoint path
    device: str = "auto"  # "auto" = cuda when available, else cpu
    progress_bar: bool = True
    peak_tflops: float | None = None  # device peak for MFU; null: known GPUs' bf16 peak, CPU: measured GEMM
    compile: bool = False  # torch.compile each transformer block (regional); the MoE exchange stays eager
    async_checkpoint: bool = False  # write checkpoints in the background (stall: one copy to host memory)
    precision: str = "auto"  # "auto" (bf16 on CUDA, else fp32), "fp32", "bf16" (fp32 router/combine), "fp64"
    accum_steps: int | None = None  # micro-steps per step (micro_batch_size then follows from the world)
    activation_checkpointing: str = "none"  # "none", "full" (blocks), "moe" (expert compute), "every_n:<n>"
    freeze: list[str] = field(default_factory=list)  # groups not trained: router, embeddings, dense, experts


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "moe_dist"
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PlanConfig:
    world_size: int = 8  # GPUs of the planned job (python -m moe_dist.plan); the run's world size
    gpus_per_node: int = 8  # GPUs per node: NVLink inside a node, the network across nodes
    gpu: str = "h100"  # hardware constants (moe_dist/hardware.py): a100, h100, h200, b200
    skew: float = 1.0  # routing: the hottest expert gets skew x the mean token copies (1 = uniform)
    search: bool = False  # try every feasible (ep, engine, micro-batch, activation checkpointing), rank them
    depth: str = (
        "auto"  # "full": run every layer; "auto": two short stacks, extrapolated (searches, deep models)
    )
    headroom: float = 0.1  # share of GPU memory kept free (CUDA context, NCCL buffers, fragmentation)
    json: str | None = None  # also write the plan (or the search) as JSON to this path
    device: str = (
        "cuda"  # "cuda": plan a GPU job; "cpu": a CPU (gloo) job: memory, traffic, syncs, no roofline
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)  # python -m moe_dist.plan only; training ignores it


def register_configs() -> None:
    """Registers the schemas so that the YAML files under configs/ are type-checked by Hydra."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="engine", name="engine_schema", node=EngineConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logging", name="logging_schema", node=LoggingConfig)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: {why}")


def validate_moe(moe: MoEConfig, *, dim: int | None = None, ep: int = 1, prefix: str = "model.moe") -> None:
    """Checks an MoE layer config (and its fit to the expert-parallel degree)."""
    p = prefix
    _require(moe.num_experts >= 0, f"{p}.num_experts", moe.num_experts, "must be >= 0")
    _require(moe.num_shared_experts >= 0, f"{p}.num_shared_experts", moe.num_shared_experts, "must be >= 0")
    _require(moe.router in ROUTERS, f"{p}.router", moe.router, f"must be one of {ROUTERS}")
    _require(
        moe.grouped_mm in GROUPED_MM_MODES,
        f"{p}.grouped_mm",
        moe.grouped_mm,
        f"must be one of {GROUPED_MM_MODES}",
    )
    _require(moe.temperature > 0, f"{p}.temperature", moe.temperature, "must be > 0")
    _require(
        moe.recv_budget is None or moe.recv_budget >= 1,
        f"{p}.recv_budget",
        moe.recv_budget,
        "must be >= 1 or null",
    )
    _require(moe.overlap_chunks >= 1, f"{p}.overlap_chunks", moe.overlap_chunks, "must be >= 1")
    _require(
        moe.overlap_chunks == 1 or moe.recv_budget is None,
        f"{p}.overlap_chunks",
        moe.overlap_chunks,
        f"cannot be combined with {p}.recv_budget={moe.recv_budget} (set one of them)",
    )
    _require(moe.every_n_layers >= 1, f"{p}.every_n_layers", moe.every_n_layers, "must be >= 1")
    _require(moe.aux_loss_coef >= 0, f"{p}.aux_loss_coef", moe.aux_loss_coef, "must be >= 0")
    _require(moe.z_loss_coef >= 0, f"{p}.z_loss_coef", moe.z_loss_coef, "must be >= 0")
    _require(moe.bias_update_rate >= 0, f"{p}.bias_update_rate", moe.bias_update_rate, "must be >= 0")
    if moe.num_experts == 0:
        return
    _require(moe.top_k >= 1, f"{p}.top_k", moe.top_k, "must be >= 1")
    _require(
        moe.top_k <= moe.num_experts,
        f"{p}.top_k",
        moe.top_k,
        f"must be <= {p}.num_experts={moe.num_experts}",
    )
    _require(moe.expert_hidden >= 1, f"{p}.expert_hidden", moe.expert_hidden, "must be >= 1")
    if moe.capacity_factor is not None:
        _require(
            0 < moe.capacity_factor < 1e6,
            f"{p}.capacity_factor",
            moe.capacity_factor,
            "must be in (0, 1e6): use null for dropless routing",
        )
    _require(
        not (moe.top_k == 1 and moe.norm_topk and moe.router != "soft"),
        f"{p}.norm_topk",
        moe.norm_topk,
        "with top_k=1 every renormalised gate is 1 and the router learns from the aux loss only; "
        "set norm_topk=false (Switch-style top-1)",
    )
    _require(ep >= 1, "parallel.ep", ep, "must be >= 1")
    _require(
        moe.num_experts % ep == 0,
        f"{p}.num_experts",
        moe.num_experts,
        f"must be divisible by parallel.ep={ep} (experts are sharded evenly over the EP ranks)",
    )
    if dim is not None:
        _require(dim >= 1, "model.dim", dim, "must be >= 1")


def validate_layout(*, world_size: int, ep: int, num_experts: int) -> None:
    """Checks the edp x ep mesh: called before any collective."""
    _require(ep >= 1, "parallel.ep", ep, "must be >= 1")
    _require(
        world_size % ep == 0,
        "parallel.ep",
        ep,
        f"must divide the world size {world_size} (world = edp x ep)",
    )
    if num_experts > 0:
        _require(
            num_experts % ep == 0,
            "model.moe.num_experts",
            num_experts,
            f"must be divisible by parallel.ep={ep}",
        )
    else:
        _require(ep == 1, "parallel.ep", ep, "must be 1 for a dense model (model.moe.num_experts=0)")


def validate_attention(m: ModelConfig) -> None:
    """Heads, key/value heads, head width and QK-norm of the attention."""
    if m.head_dim is None:
        _require(
            m.dim % m.n_heads == 0, "model.dim", m.dim, f"must be divisible by model.n_heads={m.n_heads}"
        )
        _require((m.dim // m.n_heads) % 2 == 0, "model.n_heads", m.n_heads, "head dim must be even for RoPE")
    else:
        _require(
            m.head_dim >= 2 and m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even for RoPE"
        )
    if m.n_kv_heads is not None:
        _require(
            1 <= m.n_kv_heads <= m.n_heads and m.n_heads % m.n_kv_heads == 0,
            "model.n_kv_heads",
            m.n_kv_heads,
            f"must divide model.n_heads={m.n_heads} (each key/value head serves a group of query heads)",
        )
    _require(m.qk_norm in QK_NORMS, "model.qk_norm", m.qk_norm, f"must be one of {QK_NORMS}")
    _require(
        m.loss_chunk_tokens is None or m.loss_chunk_tokens >= 0,
        "model.loss_chunk_tokens",
        m.loss_chunk_tokens,
        "must be >= 0 (0 = unchunked) or null (auto)",
    )


def validate(cfg: Config, *, world_size: int) -> None:
    """Checks the whole run config against the world size; raises ValueError naming key and value.

    Schema-level checks only: what needs another module (an engine's own config, a checkpoint on disk) is
    checked there, by ``moe_dist.trainer.validate_run``.
    """
    m, t = cfg.model, cfg.trainer
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "seq_len", "ffn_hidden"):
        _require(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    validate_attention(m)
    _require(m.init_std > 0, "model.init_std", m.init_std, "must be > 0")
    validate_moe(m.moe, dim=m.dim, ep=cfg.parallel.ep)
    _require(
        cfg.parallel.backend in BACKENDS,
        "parallel.backend",
        cfg.parallel.backend,
        f"must be one of {BACKENDS}",
    )
    timeout = cfg.parallel.timeout_s
    _require(timeout is None or timeout > 0, "parallel.timeout_s", timeout, "must be > 0 (or null)")
    validate_layout(world_size=world_size, ep=cfg.parallel.ep, num_experts=m.moe.num_experts)

    e = cfg.engine
    _require(e.name in ENGINES, "engine.name", e.name, f"must be one of {ENGINES}")
    _require(e.zero_stage in (0, 1, 2), "engine.zero_stage", e.zero_stage, "must be 0, 1 or 2")
    _require(e.prefetch >= 0, "engine.prefetch", e.prefetch, "must be >= 0")
    _require(
        e.name == "deepspeed" or e.zero_stage == 0,
        "engine.zero_stage",
        e.zero_stage,
        "needs engine.name=deepspeed (the native engine does not shard optimizer state)",
    )

    _require(e.grad_bucket_mb > 0, "engine.grad_bucket_mb", e.grad_bucket_mb, "must be > 0")

    d = cfg.data
    _require(d.name in DATASETS, "data.name", d.name, f"must be one of {DATASETS}")
    if d.mixture is None:
        if d.name in ("text", "tokens"):
            _require(bool(d.path), "data.path", d.path, f"is required for data.name={d.name}")
    else:
        _require(d.name == "tokens", "data.mixture", d.mixture, "needs data.name=tokens")
        _require(d.path is None, "data.path", d.path, "must be null when data.mixture names the datasets")
        _require(
            isinstance(d.mixture, dict)
            and len(d.mixture) > 0
            and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in d.mixture.values()
            ),
            "data.mixture",
            d.mixture,
            "must map prepared dataset directories to weights > 0, e.g. {data/web: 0.7, data/code: 0.3}",
        )
    _require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")

    _require(t.max_steps >= 1, "trainer.max_steps", t.max_steps, "must be >= 1")
    if t.stop_at_step is not None:
        _require(
            1 <= t.stop_at_step <= t.max_steps,
            "trainer.stop_at_step",
            t.stop_at_step,
            "must be in [1, max_steps]",
        )
    if t.accum_steps is None:
        _require(t.micro_batch_size >= 1, "trainer.micro_batch_size", t.micro_batch_size, "must be >= 1")
        _require(
            t.global_batch_size >= 1 and t.global_batch_size % (world_size * t.micro_batch_size) == 0,
            "trainer.global_batch_size",
            t.global_batch_size,
            f"must be a positive multiple of world_size x trainer.micro_batch_size = "
            f"{world_size} x {t.micro_batch_size}",
        )
    _require(t.lr > 0, "trainer.lr", t.lr, "must be > 0")
    _require(0 <= t.min_lr_ratio <= 1, "trainer.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    _require(t.warmup_steps >= 0, "trainer.warmup_steps", t.warmup_steps, "must be >= 0")
    _require(t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay, "must be >= 0")
    _require(t.grad_clip >= 0, "trainer.grad_clip", t.grad_clip, "must be >= 0 (0 disables)")
    _require(t.log_every >= 1, "trainer.log_every", t.log_every, "must be >= 1")
    _require(t.eval_every >= 0, "trainer.eval_every", t.eval_every, "must be >= 0 (0 disables)")
    _require(t.eval_batches >= 1, "trainer.eval_batches", t.eval_batches, "must be >= 1")
    _require(t.ckpt_every >= 0, "trainer.ckpt_every", t.ckpt_every, "must be >= 0 (0 disables)")
    _require(t.max_nonfinite_skips >= 0, "trainer.max_nonfinite_skips", t.max_nonfinite_skips, "must be >= 0")
    _require(t.collapse_warn_steps >= 0, "trainer.collapse_warn_steps", t.collapse_warn_steps, "must be >= 0")
    _require(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    _require(t.device in ("auto", "cpu", "cuda"), "trainer.device", t.device, "must be auto, cpu or cuda")
    _require(
        set(t.freeze) <= set(FREEZE_GROUPS) and len(set(t.freeze)) == len(t.freeze),
        "trainer.freeze",
        t.freeze,
        f"must list distinct groups out of {list(FREEZE_GROUPS)}",
    )
    _require(set(t.freeze) != set(FREEZE_GROUPS), "trainer.freeze", t.freeze, "leaves nothing to train")
    _require(
        t.peak_tflops is None or t.peak_tflops > 0,
        "trainer.peak_tflops",
        t.peak_tflops,
        "must be > 0 or null",
    )
    _require(
        cfg.logging.wandb.mode in WANDB_MODES,
        "logging.wandb.mode",
        cfg.logging.wandb.mode,
        f"must be one of {WANDB_MODES}",
    )

    # Precision, the batch split into micro-steps, activation checkpointing, the aux-loss scope.
    _require(t.precision in PRECISIONS, "trainer.precision", t.precision, f"must be one of {PRECISIONS}")
    if t.accum_steps is not None:
        _require(t.accum_steps >= 1, "trainer.accum_steps", t.accum_steps, "must be >= 1 (or null)")
        _require(
            t.global_batch_size >= 1 and t.global_batch_size % (world_size * t.accum_steps) == 0,
            "trainer.accum_steps",
            t.accum_steps,
            f"cannot be kept at world size {world_size}: trainer.global_batch_size={t.global_batch_size} "
            f"must be a positive multiple of world_size x accum_steps = {world_size} x {t.accum_steps}",
        )
    ac_kind, _ = parse_activation_checkpointing(t.activation_checkpointing)
    # The chunked pipeline runs its own backward per chunk inside the block's backward: a checkpointed block
    # would be recomputed again for each of them (torch's checkpoint refuses: found by moe_dist.plan).
    _require(
        m.moe.overlap_chunks == 1 or ac_kind != "every_n",
        "trainer.activation_checkpointing",
        t.activation_checkpointing,
        f"cannot be combined with model.moe.overlap_chunks={m.moe.overlap_chunks} (use none or moe, or "
        "overlap_chunks=1)",
    )
    _require(
        m.moe.aux_loss_scope in AUX_LOSS_SCOPES,
        "model.moe.aux_loss_scope",
        m.moe.aux_loss_scope,
        f"must be one of {AUX_LOSS_SCOPES}",
    )


def batch_layout(t: TrainerConfig, *, world_size: int) -> tuple[int, int]:
    """(sequences per rank per micro-step, micro-steps per optimizer step) at this world size.

    ``trainer.accum_steps`` fixes the micro-steps (the per-rank micro-batch follows from the world size);
    otherwise ``trainer.micro_batch_size`` is fixed and the micro-steps follow.
    """
    if t.accum_steps is not None:
        return t.global_batch_size // (world_size * t.accum_steps), t.accum_steps
    return t.micro_batch_size, t.global_batch_size // (world_size * t.micro_batch_size)


def parse_activation_checkpointing(mode: str) -> tuple[str, int]:
    """``trainer.activation_checkpointing`` → (kind, n): ("none", 0), ("full", 1), ("moe", 0), ("every_n", n)."""
    if mode in ("none", "moe"):
        return mode, 0
    if mode == "full":
        return "every_n", 1
    kind, _, n = mode.partition(":")
    _require(
        kind == "every_n" and n.isdigit() and int(n) >= 1,
        "trainer.activation_checkpointing",
        mode,
        f"must be one of {ACTIVATION_CHECKPOINTING} with n >= 1",
    )
    return "every_n", int(n)


PLAN_DEPTHS = ("auto", "full")


def validate_plan(p: PlanConfig) -> None:
    """The plan.* keys (python -m moe_dist.plan); the GPU name is checked against moe_dist/hardware.py there."""
    _require(p.world_size >= 1, "plan.world_size", p.world_size, "must be >= 1")
    _require(p.gpus_per_node >= 1, "plan.gpus_per_node", p.gpus_per_node, "must be >= 1")
    _require(
        p.world_size < p.gpus_per_node or p.world_size % p.gpus_per_node == 0,
        "plan.world_size",
        p.world_size,
        f"must fill whole nodes: a multiple of plan.gpus_per_node={p.gpus_per_node}",
    )
    _require(p.skew >= 1.0, "plan.skew", p.skew, "must be >= 1 (1 = uniform routing)")
    _require(p.depth in PLAN_DEPTHS, "plan.depth", p.depth, f"must be one of {PLAN_DEPTHS}")
    _require(0 <= p.headroom < 1, "plan.headroom", p.headroom, "must be in [0, 1)")
    _require(p.device in ("cuda", "cpu"), "plan.device", p.device, "must be cuda or cpu")
