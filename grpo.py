"""Loss-masked GRPO: group advantages, memory-safe per-token log-probs, and the clipped policy loss.

GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300) drops PPO's value network: each prompt is answered G
times, and a trajectory's advantage is its reward measured against the other G − 1 answers to the same
prompt. Every policy-sampled token of trajectory i is then pushed up or down by that one number through
PPO's clipped ratio objective. Atom-Searcher (arXiv 2508.12800) trains with GRPO on DeepResearcher's
recipe (PAPER.md §1 and §4), with tool-response tokens masked out of the loss: they are context the policy reads,
not actions it took. The mask is data (search_env.Trajectory.mask, 1 = sampled by the policy); here it is
applied in exactly one line of `grpo_loss`.

    A_i     = (R_i − mean_G R) / (std_G R + 1e-6)                 group advantage   (Dr. GRPO: R_i − mean_G R)
    r_t     = exp(logp_t − old_logp_t)                            importance ratio π_θ / π_old
    pg_t    = −min(r_t A, clip(r_t, 1 − ε_low, 1 + ε_high) A)     clipped surrogate (PPO; clip-higher: DAPO)
    w_t     = sg[min(exp(old_logp_t − sampler_logp_t), C)]        truncated importance weight (TIS)
    k3_t    = exp(δ_t) − δ_t − 1,  δ_t = ref_logp_t − logp_t      KL to π_ref (joschu.net/blog/kl-approx.html)
    L       = Σ_{b,t} m_{b,t} (w_t pg_t + β k3_t) / N_tok           token-mean over the whole optimizer step

Our choices (where the papers or references differ or are silent):
1. std is the unbiased (n − 1) sample std, as torch.std and verl (DeepResearcher's trainer) use, so
   advantages are comparable with theirs; a group whose rewards are all equal gets exactly 0 (no 0/0).
2. Aggregation is DAPO's token-mean over all mask-1 tokens of the optimizer step (arXiv 2503.14476), with
   the global count N_tok passed in by the caller, so splitting the step into micro-batches or ranks does not
   change the gradient. DeepResearcher's per-micro-batch mean does (training_design.md §3.4).
3. TIS (Feng Yao et al., fengyao.notion.site/off-policy-rl) corrects for vLLM's log-probs differing from the
   trainer's; it is off when `sampler_logp` is None. The KL term is off when β = 0 or `ref_logp` is None
   (the default, as in TRL, DAPO and Dr. GRPO; DeepResearcher uses β = 0.001).
4. No dual clip (verl's clip_ratio_c): with one optimizer step per rollout batch (the default, DESIGN.md)
   the ratio is exactly 1 and it would never act. No entropy bonus (DeepResearcher's 0.001; PAPER.md §4
   marks it optional): `token_logprobs(with_entropy=True)` gives the entropy for logging.
5. `token_logprobs` never materializes the (B, T, V) logits. It runs the model's root forward (so FSDP2's root
   hooks unshard lm_head's weight and reduce-scatter its gradient) with lm_head's forward swapped, for that one
   call, for a hand-written autograd Function from the final hidden states to the per-token log-probs: the
   logits exist `chunk` rows at a time in the forward and one vocabulary slice at a time in the backward,
   which recomputes them (training_design.md §3.7 sketches a torch.utils.checkpoint form over full logits).
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

What is not covered: sequence-level importance weights, PPO value functions, reward normalisation across
groups. The caller (train.py) owns micro-batching, the global token count and dropping all-zero groups.

Tests: `python -m pytest -q tests/test_grpo.py`. Speed and memory: `python bench/bench_grpo.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- advantages

def group_advantages(rewards, group_size: int, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """Per-trajectory GRPO advantages, float32 (B,). Groups are contiguous blocks of `group_size` rows.

    scale="std":  A_i = (R_i − mean) / (std + eps), std unbiased (torch.std, as verl).
    scale="none": A_i = R_i − mean, Dr. GRPO (arXiv 2503.20783): no per-question difficulty reweighting.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64)  # float64: means of G floats stay exact enough
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' (GRPO) or 'none' (Dr. GRPO), got {scale!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (GRPO compares samples of one prompt), got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards is not a multiple of group_size={group_size}: "
                         "each prompt's G samples must sit in one contiguous block")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    r = rewards.view(-1, group_size)                                   # (B/G, G)
    adv = r - r.mean(dim=1, keepdim=True)                              # R_i − mean_G R
    if scale == "std":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)                 # / (std_G R + eps), unbiased std
    # A float mean of equal values can be off by one ulp; force such groups to exactly 0 so that
    # `nonzero_groups` can drop them (they carry no policy-gradient signal, only the KL term).
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)                    # (B/G, 1)
    return adv.masked_fill(flat, 0.0).reshape(-1).float()              # (B,)


def nonzero_groups(advantages: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool (B,): True for trajectories whose group has any nonzero advantage (False = droppable group).

    The caller drops the False rows before micro-batching (training_design.md §5 #21; DAPO's dynamic
    sampling goes further and refills the batch). Usage: `keep = nonzero_groups(A, G); batch = batch[keep]`.
    """
    if advantages.dim() != 1 or advantages.numel() % group_size != 0:
        raise ValueError(f"advantages must be (B,) with B a multiple of group_size={group_size}, "
                         f"got shape {tuple(advantages.shape)}")
    alive = (advantages.view(-1, group_size) != 0).any(dim=1)           # (B/G,)
    return alive.repeat_interleave(group_size)                          # (B,)


def loss_mask(policy_mask: torch.Tensor, response_mask: torch.Tensor, use_loss_mask: bool = True) -> torch.Tensor:
    """The mask `grpo_loss` trains on (B, T). This is where the `--no-loss-mask` ablation happens.

    policy_mask:   1 where the policy sampled the token (Trajectory.mask), 0 for tool responses, glue, pads.
    response_mask: 1 on every real token after the prompt (policy and tool tokens), 0 on prompt and pads.
    use_loss_mask=False trains on tool-response tokens too, the ablation Atom-Searcher's masking is compared
    against. Either way position 0 should be 0: it has no prediction (`token_logprobs` gives it 0.0).
    """
    if policy_mask.shape != response_mask.shape:
        raise ValueError(f"policy_mask {tuple(policy_mask.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape (B, T)")
    return policy_mask if use_loss_mask else response_mask


# ----------------------------------------------------------------------------- log-probs

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
    hooks unshard lm_head's weight and later reduce-scatter its gradient (training_design.md §3.7), but for
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


# ----------------------------------------------------------------------------- the loss

def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              n_tokens, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2,
              sampler_logp: torch.Tensor | None = None, tis_cap: float = 2.0,
              ref_logp: torch.Tensor | None = None, kl_beta: float = 0.0):
    """The GRPO loss of one micro-batch and a dict of float stats. All (B, T) tensors share one alignment.

    logp:         π_θ log-probs with grad (token_logprobs).   old_logp: π_old, no grad (= logp.detach() for
    one optimizer step per rollout batch; then r ≡ 1).        advantages: (B,) per trajectory or (B, T).
    mask:         1 = train on this token (loss_mask). Values of the other inputs at mask-0 positions are
                  ignored (they may be anything finite or not, e.g. the rollout's 0.0 for tool tokens).
    n_tokens:     mask-1 tokens in the whole optimizer step over all micro-batches and ranks (> 0), so that
                  Σ over micro-batches of backward(loss) is the gradient of the step's token-mean.
    clip_eps_*:   ε_low, ε_high of the ratio clip; 0.2/0.2 is GRPO's, 0.2/0.28 DAPO's clip-higher.
    sampler_logp: the rollout engine's log-probs for TIS with cap `tis_cap`; None disables it.
    ref_logp, kl_beta: the k3 KL penalty to the reference; off when either is None / 0.

    Stats (floats, over this micro-batch's mask-1 tokens; the caller weights them by "tokens" to combine):
    loss (this micro-batch's share of the step loss), pg_loss (mean w·pg), kl (mean k3), clip_frac (tokens
    whose clipped branch is active, i.e. get no gradient), ratio_min/ratio_max (1.0 if no tokens), tis_mean,
    tis_capped_frac (w hit the cap), masked_frac (mask-0 share of all B·T positions), tokens (mask-1 count).
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    for name, x in (("old_logp", old_logp), ("mask", mask), ("sampler_logp", sampler_logp), ("ref_logp", ref_logp)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(logp.shape)} like logp")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(logp.shape)}, got {tuple(advantages.shape)}")
    if not (0 <= clip_eps_low < 1 and clip_eps_high >= 0):
        raise ValueError(f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {clip_eps_low}, {clip_eps_high}")
    if not tis_cap > 0 or kl_beta < 0:
        raise ValueError(f"need tis_cap > 0 and kl_beta >= 0, got {tis_cap}, {kl_beta}")
    if not float(n_tokens) > 0:
        raise ValueError(f"n_tokens must be > 0 (the step's global mask-1 count), got {n_tokens}; "
                         "skip steps with nothing to train on")

    m = mask.bool()                                                    # (B, T)
    A = (advantages[:, None] if advantages.dim() == 1 else advantages).to(logp.dtype)  # (B, 1) or (B, T)
    lp_d = logp.detach()
    # Outside the mask, replace the reference log-probs by logp itself: ratio 1, TIS weight 1, KL 0 there.
    # Multiplying by the mask alone is not enough: an inf there would give 0 · inf = NaN in the gradient.
    old = torch.where(m, old_logp.detach(), lp_d)                      # (B, T)

    ratio = torch.exp(logp - old)                                      # r = π_θ / π_old
    pg_plain = -A * ratio                                              # −r A
    pg_clip = -A * ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)   # −clip(r, 1−ε_low, 1+ε_high) A
    pg = torch.maximum(pg_plain, pg_clip)                              # −min(r A, clip(r) A)

    tis = torch.ones_like(lp_d)
    if sampler_logp is not None:                                       # w = sg[min(π_old / π_sampler, C)]
        tis = torch.exp(old - torch.where(m, sampler_logp.detach(), old)).clamp(max=tis_cap).detach()
    per_pg = tis * pg                                                  # (B, T) w · pg
    per_token = per_pg

    k3 = torch.zeros_like(lp_d)
    if kl_beta > 0 and ref_logp is not None:
        # δ = log π_ref − log π_θ, clamped to [−20, 20] as verl does: exp(20) is finite in fp32, and a gap
        # of 20 nats means something else is broken (the clamp then stops this token's KL gradient).
        delta = (torch.where(m, ref_logp.detach(), lp_d) - logp).clamp(-20.0, 20.0)
        k3 = torch.exp(delta) - delta - 1                              # k3 = e^δ − δ − 1 ≥ 0
        per_token = per_token + kl_beta * k3

    # The loss mask, applied once: Σ m·ℓ / N_tok (token-mean over the optimizer step).
    loss = torch.where(m, per_token, 0.0).sum() / n_tokens

    with torch.no_grad():                                              # stats over this micro-batch's mask-1 tokens
        n_local = m.sum()
        denom = n_local.clamp(min=1).to(lp_d.dtype)

        def masked_mean(x):
            return torch.where(m, x.to(lp_d.dtype), 0.0).sum() / denom

        big = torch.finfo(lp_d.dtype).max
        values = torch.stack([
            loss.detach(), masked_mean(per_pg.detach()), masked_mean(k3.detach()),
            masked_mean(pg_clip > pg_plain),                           # clip active: the token gets no gradient
            torch.where(m, ratio.detach(), big).min(), torch.where(m, ratio.detach(), -big).max(),
            masked_mean(tis), masked_mean(tis >= tis_cap) if sampler_logp is not None else lp_d.new_zeros(()),
            1.0 - m.to(lp_d.dtype).mean(), n_local.to(lp_d.dtype)]).tolist()  # one device sync
    names = ["loss", "pg_loss", "kl", "clip_frac", "ratio_min", "ratio_max", "tis_mean", "tis_capped_frac",
             "masked_frac", "tokens"]
    stats = dict(zip(names, values))
    if stats["tokens"] == 0:                                           # an all-padding micro-batch
        stats["ratio_min"] = stats["ratio_max"] = 1.0
    if stats["tokens"] > float(n_tokens):
        raise ValueError(f"n_tokens={n_tokens} is smaller than this micro-batch's {int(stats['tokens'])} "
                         "mask-1 tokens: pass the global count over the whole optimizer step")
    return loss, stats
