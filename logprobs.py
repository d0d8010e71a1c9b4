"""Memory-safe per-token log-probs: the one forward that GRPO's loss and SFT's cross-entropy both train through.

`token_logprobs(model, input_ids)` -> log π(token_t | tokens_<t) for every position, (B, T) fp32
(METHOD.md §8.3), without the (B, T, V) logits ever existing at once.

`token_logprobs` never materializes the (B, T, V) logits. It runs the model's root forward (so FSDP2's root
hooks unshard lm_head's weight and reduce-scatter its gradient) with lm_head's forward swapped, for that one
call, for a hand-written autograd Function from the final hidden states to the per-token log-probs: the
logits exist `chunk` rows at a time in the forward and one vocabulary slice at a time in the backward,
which recomputes them (METHOD.md §8.3 sketches a torch.utils.checkpoint form over full logits).
The recomputation is one more lm_head-sized matmul; the backward skips rows without gradient (prompt,
tool and padding tokens), which wins it back on a loss-masked batch. bench/bench_grpo.py on a shared 2-core
AVX2 CPU: the update takes 0.73–0.88x the time of a plain cross-entropy step (three runs; every token
trained: 0.91–1.00x; the previous chunked log-softmax over full logits: 0.78–0.96x). Peak memory of
hidden states → log-probs → backward at H = 3584, V = 152k, T = 512, measured in fp32 (this CPU's bf16
matmuls are too slow) and with lm_head frozen so that only what grows with T counts: 0.29x the fp32
logits (previous method 2.17x, naive fp32 log_softmax 3.04x); with the weight gradient, 2.11 GiB, its
memory formula's 2.09 GiB. That formula gives 0.27x the bf16 logits (9.3 GiB) at T = 32k in bf16, computed,
not measured: grad_W 1.02 GiB, fp32 grad_h 0.44, the gradient rows' copy of h 0.22, one block 0.65 (an fp32
vocab slice, its bf16 copy and one (N, H) product), the hidden states themselves 0.22.

Tests: `python -m pytest -q tests/test_grpo.py`. Speed and memory: `python bench/bench_grpo.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearLogSoftmaxGather(torch.autograd.Function):
    """logp[n] = log softmax(h[n] Wᵀ / T)[y[n]] for rows n of the hidden states h (N, H), W = lm_head (V, H),
    without ever holding the (N, V) logits.

    Forward, `chunk` rows at a time: z_c = h_c Wᵀ in the weight's dtype (the product lm_head would compute),
    an fp32 copy z_c / T, and from it the logsumexp (kept, (N,)), the target's log-prob and optionally the entropy.

    Backward. With g_n = ∂L/∂logp_n and P = softmax(z / T), the logit gradient and its two products are
        G_{n,v} = g_n (onehot(y_n)_v − P_{n,v}) / T,      ∂L/∂W = Gᵀ h  (V, H),      ∂L/∂h = G W  (N, H).
    It walks the VOCABULARY in slices of `width` columns, and for each slice v recomputes Z_v = h W_vᵀ / T in fp32,
    P_v = exp(Z_v − lse) and G_v, then writes ∂L/∂W_v = G_vᵀ h with ONE matmul over all rows. So every row of
    the weight gradient is produced, and rounded to the weight's dtype, once, as an unchunked backward does;
    walking the rows instead would sum W's gradient over chunks, in bf16 or in an fp32 (V, H) buffer.
    ∂L/∂h = Σ_v G_v W_v is summed over the slices in fp32 and cast to h's dtype at the end.
    Memory beyond the saved h: the weight gradient (V, H) in the weight's dtype, which any method hands to
    autograd; the fp32 (N, H) accumulator and the gradient rows' copy of h; one block of ~chunk·V elements
    (fp32, plus a copy in the weight's dtype). The price is a third matmul of h against W that lm_head's own
    backward does not do; rows with g_n = 0 (the last position, padding, loss-masked prompt and tool tokens)
    add exactly 0 and are skipped.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk, with_entropy):
        inv_t = 1.0 / temperature
        n_rows = hidden.shape[0]
        stat_dtype = torch.promote_types(weight.dtype, torch.float32)   # bf16 -> fp32; fp64 stays fp64 (tests)
        lse = hidden.new_empty(n_rows, dtype=stat_dtype)               # (N,) logsumexp_v z_v / T
        logp = hidden.new_empty(n_rows, dtype=stat_dtype)              # (N,)
        entropy = hidden.new_empty(n_rows if with_entropy else 0, dtype=stat_dtype)
        for s in range(0, n_rows, chunk):
            x = (hidden[s:s + chunk] @ weight.T).to(stat_dtype).mul_(inv_t)  # (c, V) z / T, one chunk only
            lse[s:s + chunk] = torch.logsumexp(x, dim=-1)
            # log p(y) = z_y / T − logsumexp(z / T)
            logp[s:s + chunk] = x.gather(-1, labels[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            if with_entropy:                                           # H = logsumexp − Σ_v p_v z_v / T
                p = (x - lse[s:s + chunk, None]).exp_()
                entropy[s:s + chunk] = lse[s:s + chunk] - p.mul_(x).sum(-1)
        ctx.save_for_backward(hidden, weight, labels, lse)             # h and W are kept by the model anyway
        ctx.inv_t, ctx.block = inv_t, chunk * weight.shape[0]          # the backward's block: ~chunk·V elements
        ctx.mark_non_differentiable(entropy)                          # entropy is for logging only
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels, lse = ctx.saved_tensors
        inv_t = ctx.inv_t
        rows = grad_logp.nonzero().squeeze(1)                          # (n,) rows with a gradient (a host sync)
        h, y, lse = hidden[rows], labels[rows], lse[rows]              # (n, H), (n,), (n,)
        g = (grad_logp[rows] * inv_t).to(lse.dtype)[:, None]           # (n, 1) g / T
        vocab, width = weight.shape[0], max(1, ctx.block // max(len(rows), 1))  # an (n, width) block per slice
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None  # (V, H), weight's dtype
        grad_h = torch.zeros(h.shape, dtype=lse.dtype, device=h.device)  # (n, H) fp32 accumulator
        for v in range(0, vocab, width):
            w_v = weight[v:v + width]                                  # (width, H) one vocab slice
            p = (h @ w_v.T).to(lse.dtype).mul_(inv_t)                  # (n, width) Z_v = z / T, recomputed
            p.sub_(lse[:, None]).exp_().mul_(-g)                       # −g/T · P_v
            hit = (y >= v) & (y < v + width)                           # targets inside this slice get + g/T
            p.scatter_add_(1, (y - v).clamp(0, len(w_v) - 1)[:, None], torch.where(hit[:, None], g, 0.0))
            grad_z = p.to(weight.dtype)                                # (n, width) G_v, in the logits' dtype
            if grad_weight is not None:                                # (a frozen lm_head needs no ∂L/∂W)
                torch.mm(grad_z.T, h, out=grad_weight[v:v + width])    # ∂L/∂W_v = G_vᵀ h, all rows at once
            grad_h += grad_z @ w_v                                     # ∂L/∂h += G_v W_v, summed in fp32
            del p, grad_z                                              # freed before the next block is made
        grad_hidden = torch.zeros_like(hidden)                         # (N, H): skipped rows get exactly 0
        grad_hidden[rows] = grad_h.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   temperature: float = 1.0, chunk: int = 512, with_entropy: bool = False):
    """Per-token log-probs of `input_ids` under `model` at the sampling temperature: logp (B, T) fp32.

    logp[:, t] = log softmax(z_{t−1} / T)[input_ids[:, t]], the log-prob of token t given tokens < t;
    logp[:, 0] = 0.0 (nothing predicts the first token). With `with_entropy=True` also returns the entropy
    (B, T) of the same next-token distributions (no gradient, for logging), aligned the same way.

    The (B, T, V) logits are never materialized. The model's root forward runs as usual, so FSDP2's root
    hooks unshard lm_head's weight and later reduce-scatter its gradient (METHOD.md §8.3), but for
    this one call its output embedding (an nn.Linear without bias, lm_head in HF's CausalLMs) maps the final
    hidden states (B, T, H) straight to log-probs (B, T) through `_LinearLogSoftmaxGather`; HF's CausalLM
    passes that through as `.logits`. Logits then exist only `chunk` rows at a time (forward) or one vocab
    slice of ~chunk·V elements (backward). Memory beyond the hidden states: lm_head's weight gradient (which
    any method produces), an fp32 (B·T, H) buffer, and that block (chunk=512, V=152k: 0.3 GB in fp32, plus
    a bf16 copy). A tied embedding gets both gradients, autograd sums them. Right-padding with
    attention_mask=None is fine for causal models: real tokens never attend to later pads, and pads are
    masked in the loss.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (rows per fp32 chunk), got {chunk!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError("token_logprobs needs a causal LM whose output embedding (get_output_embeddings()) "
                         f"is an nn.Linear without bias, as HF's *ForCausalLM have; got {type(head).__name__}")
    B, T = input_ids.shape
    V = head.out_features
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"input_ids must lie in [0, {V}) (the model's vocab), got min {lo}, max {hi}")
    # The prediction at position t is for token t + 1; the last position has no target (dummy 0, dropped).
    targets = torch.cat([input_ids[:, 1:], input_ids.new_zeros(B, 1)], dim=1)  # (B, T)
    result = {}

    def logprobs_head(hidden):                                         # (B, T, H) final hidden states -> (B, T)
        if hidden.shape[:2] != (B, T):
            raise ValueError(f"lm_head got hidden states of shape {tuple(hidden.shape)}, expected ({B}, {T}, H)")
        # head.weight is read here, inside the forward: under FSDP2 that is the unsharded weight.
        logp_next, result["entropy"] = _LinearLogSoftmaxGather.apply(
            hidden.reshape(B * T, -1), head.weight, targets.reshape(B * T), float(temperature), chunk, with_entropy)
        result["logp"] = logp_next.view(B, T)
        return result["logp"]

    own_forward = head.__dict__.get("forward")                         # None unless someone already patched it
    head.forward = logprobs_head                                       # this instance only; module hooks still run
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        if own_forward is None:
            del head.forward                                           # back to nn.Linear.forward
        else:
            head.forward = own_forward
    if out.logits is not result.get("logp"):
        raise ValueError(f"{type(model).__name__} changed lm_head's output before returning it as .logits "
                         "(a cast, slice or soft-capping?); token_logprobs needs it passed through unchanged")
    logp = F.pad(result["logp"][:, :-1], (1, 0))                       # (B, T), logp[:, 0] = 0
    if not with_entropy:
        return logp
    return logp, F.pad(result["entropy"].view(B, T)[:, :-1], (1, 0))   # (B, T)
