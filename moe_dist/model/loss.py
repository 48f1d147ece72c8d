"""Cross-entropy of the LM head computed in chunks of tokens: the [tokens, vocab] logits never exist at once.

Legend: T tokens, D model dim, V vocab, C tokens per chunk.

The plain loss materialises fp32 logits [T, V] and their gradient (at V = 152k and T = 16k, about 10 GB
each). Here the forward keeps, per token, only the log-sum-exp of its logits; the backward recomputes the
logits of one chunk at a time and turns them into the gradients of the hidden states and the head weight
right away. Peak extra memory is a few [C, V] buffers, whatever T is. The matmuls run in the autocast dtype
when autocast is on (as the plain ``F.linear`` under autocast would), else in the inputs' dtype (bf16 under
FSDP2's mixed precision); the softmax and the sums in the accumulation dtype of moe_dist/precision.py (fp32;
fp64 in fp64 mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_dist.precision import accum_dtype

IGNORE_INDEX = -100  # targets with this id carry no loss (prompt tokens of supervised fine-tuning)
AUTO_CHUNK_ELEMENTS = 1 << 26  # auto chunk: at most this many logits (256 MiB in fp32) per chunk
MIN_AUTO_CHUNK_TOKENS = 128


def chunk_tokens_for(vocab_size: int, chunk_tokens: int | None) -> int:
    """Tokens per chunk: ``chunk_tokens`` when set, else as many as keep a chunk's logits <= 2^26 entries."""
    if chunk_tokens:
        return chunk_tokens
    return max(MIN_AUTO_CHUNK_TOKENS, AUTO_CHUNK_ELEMENTS // vocab_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens with a target of -log softmax(h W^T)[target]; gradients for h and W."""

    @staticmethod
    def forward(ctx, h_TD, w_VD, targets_T, chunk, compute_dtype):
        w_cd = w_VD.to(compute_dtype)
        acc_dtype = accum_dtype(h_TD)  # softmax and sums: fp32 (also for bf16 matmuls), fp64 in fp64 mode
        lse_T = torch.empty(h_TD.shape[0], dtype=acc_dtype, device=h_TD.device)
        total = torch.zeros((), dtype=acc_dtype, device=h_TD.device)
        for start in range(0, h_TD.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits_CV = (h_TD[rows].to(compute_dtype) @ w_cd.t()).to(acc_dtype)
            lse_C = logits_CV.logsumexp(dim=-1)
            targets_C = targets_T[rows]
            valid_C = targets_C != IGNORE_INDEX
            picked_C = logits_CV.gather(1, targets_C.clamp_min(0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid_C, lse_C - picked_C, 0.0).sum()
            lse_T[rows] = lse_C
        ctx.save_for_backward(h_TD, w_VD, targets_T, lse_T)
        ctx.chunk, ctx.compute_dtype = chunk, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h_TD, w_VD, targets_T, lse_T = ctx.saved_tensors
        chunk, compute_dtype = ctx.chunk, ctx.compute_dtype
        w_cd = w_VD.to(compute_dtype)
        grad_h_TD = torch.empty_like(h_TD)
        acc_dtype = lse_T.dtype
        # A frozen head (trainer.freeze=[embeddings]) needs no weight gradient: neither its [V, D] buffer
        # nor the matmul that fills it.
        needs_w = ctx.needs_input_grad[1]
        grad_w_VD = torch.zeros(w_VD.shape, dtype=acc_dtype, device=w_VD.device) if needs_w else None
        for start in range(0, h_TD.shape[0], chunk):
            rows = slice(start, start + chunk)
            h_CD = h_TD[rows].to(compute_dtype)
            logits_CV = (h_CD @ w_cd.t()).to(acc_dtype)
            targets_C = targets_T[rows]
            valid_C = targets_C != IGNORE_INDEX
            # d loss / d logits = softmax - onehot(target), zero on ignored rows, times the incoming gradient
            grad_CV = logits_CV.sub_(lse_T[rows].unsqueeze(1)).exp_()  # in place: one [C, V] buffer
            grad_CV.scatter_add_(
                1, targets_C.clamp_min(0).unsqueeze(1), grad_CV.new_full((len(targets_C), 1), -1.0)
            )
            grad_CV.mul_((valid_C.to(grad_CV.dtype) * grad_total).unsqueeze(1))
            grad_CV = grad_CV.to(compute_dtype)
            grad_h_TD[rows] = (grad_CV @ w_cd).to(h_TD.dtype)
            if needs_w:
                grad_w_VD += (grad_CV.t() @ h_CD).to(acc_dtype)
        return grad_h_TD, grad_w_VD.to(w_VD.dtype) if needs_w else None, None, None, None


def linear_cross_entropy(
    h_TD: torch.Tensor, w_VD: torch.Tensor, targets_T: torch.Tensor, *, chunk_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token losses, number of tokens with a target) of the LM head ``h @ W^T``.

    ``chunk_tokens``: None picks a chunk from the vocabulary size, 0 computes the plain unchunked loss
    (``F.cross_entropy`` over the full logits), n > 0 uses chunks of n tokens. All give the same value.
    """
    num_targets = (targets_T != IGNORE_INDEX).sum()
    if chunk_tokens == 0:
        logits_TV = F.linear(h_TD, w_VD)
        logits_TV = logits_TV.to(accum_dtype(logits_TV))
        return F.cross_entropy(logits_TV, targets_T, ignore_index=IGNORE_INDEX, reduction="sum"), num_targets
    device_type = h_TD.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h_TD.dtype
    )
    chunk = chunk_tokens_for(w_VD.shape[0], chunk_tokens)
    with torch.autocast(device_type, enabled=False):
        total = _ChunkedLinearCrossEntropy.apply(h_TD, w_VD, targets_T, chunk, compute_dtype)
    return total, num_targets
