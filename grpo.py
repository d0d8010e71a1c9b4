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
5. `token_logprobs` computes the log-softmax in fp32 in row chunks with a hand-written backward instead of
   torch.utils.checkpoint (training_design.md §3.7 sketches the checkpoint form). Both avoid any fp32
   (B, T, V) tensor; the hand-written backward also skips the recomputed forward and the concatenation of
   per-chunk gradients. bench/bench_grpo.py (2-core CPU): the update takes 0.99x the time of a plain
   cross-entropy step (checkpoint form: 1.19x), and the peak memory of log-probs + backward at V = 152k,
   T = 4k is 2.4x the bf16 logits (checkpoint form: 3.1x, naive fp32 log_softmax: 7.0x).

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

def _to_fp32_copy(x: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """A fresh fp32 (or wider) copy of x scaled by 1/T: z / T. Always a copy, so in-place ops on it are safe
    even when x already is fp32 (a plain .float() would alias it and we would overwrite the logits)."""
    dtype = torch.promote_types(x.dtype, torch.float32)                # bf16 -> fp32; fp64 stays fp64 (tests)
    return x.to(dtype, copy=True).mul_(inv_temperature)


class _ChunkedLogSoftmaxGather(torch.autograd.Function):
    """logp[n] = log softmax(z[n] / T)[y[n]] over rows n of z (N, V), in fp32, `chunk` rows at a time.

    The forward keeps only logsumexp per row (N,); the backward recomputes the softmax of one chunk at a
    time and writes d logp / d z = (onehot(y) − softmax(z / T)) / T straight into one gradient tensor in
    the logits' dtype. So no fp32 (N, V) tensor ever exists, in the forward or in the backward.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk, with_entropy):
        inv_t = 1.0 / temperature
        n_rows = logits.shape[0]
        stat_dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = logits.new_empty(n_rows, dtype=stat_dtype)               # (N,) logsumexp_v z_v / T
        logp = logits.new_empty(n_rows, dtype=stat_dtype)              # (N,)
        entropy = logits.new_empty(n_rows if with_entropy else 0, dtype=stat_dtype)
        for s in range(0, n_rows, chunk):
            x = _to_fp32_copy(logits[s:s + chunk], inv_t)              # (c, V) fp32, one chunk only
            lse[s:s + chunk] = torch.logsumexp(x, dim=-1)
            # log p(y) = z_y / T − logsumexp(z / T)
            logp[s:s + chunk] = x.gather(-1, labels[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            if with_entropy:                                           # H = logsumexp − Σ_v p_v z_v / T
                p = (x - lse[s:s + chunk, None]).exp_()
                entropy[s:s + chunk] = lse[s:s + chunk] - p.mul_(x).sum(-1)
        ctx.save_for_backward(logits, labels, lse)                     # logits are kept anyway by the model
        ctx.inv_t, ctx.chunk = inv_t, chunk
        ctx.mark_non_differentiable(entropy)                          # entropy is for logging only
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse = ctx.saved_tensors
        inv_t, chunk = ctx.inv_t, ctx.chunk
        grad = torch.empty_like(logits)                                # (N, V) in the logits' dtype (bf16 on GPU)
        g = grad_logp * inv_t                                          # (N,) upstream grad / T
        for s in range(0, logits.shape[0], chunk):
            p = _to_fp32_copy(logits[s:s + chunk], inv_t)              # (c, V) z / T
            p.sub_(lse[s:s + chunk, None]).exp_()                      # softmax(z / T)
            gs = g[s:s + chunk, None]                                  # (c, 1)
            p.mul_(-gs).scatter_add_(-1, labels[s:s + chunk, None], gs)  # g/T · (onehot(y) − softmax)
            grad[s:s + chunk] = p
        return grad, None, None, None, None


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   temperature: float = 1.0, chunk: int = 512, with_entropy: bool = False):
    """Per-token log-probs of `input_ids` under `model` at the sampling temperature: logp (B, T) fp32.

    logp[:, t] = log softmax(z_{t−1} / T)[input_ids[:, t]], the log-prob of token t given tokens < t;
    logp[:, 0] = 0.0 (nothing predicts the first token). With `with_entropy=True` also returns the entropy
    (B, T) of the same next-token distributions (no gradient, for logging), aligned the same way.

    Calls the whole model (its root forward, so FSDP2's root hooks run; training_design.md §3.7) and takes
    its logits (bf16 on GPU). The fp32 log-softmax runs `chunk` rows of the flattened B·T at a time, so the
    extra memory is ~2 fp32 (chunk, V) buffers (chunk=512, V=152k: ~0.6 GB) on top of the logits and their
    gradient. Right-padding with attention_mask=None is fine for causal models: real tokens never attend to
    later pads, and pads are masked in the loss.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (rows per fp32 chunk), got {chunk!r}")
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    B, T = input_ids.shape
    if logits.dim() != 3 or logits.shape[:2] != (B, T):
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, expected ({B}, {T}, V)")
    V = logits.shape[-1]
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"input_ids must lie in [0, {V}) (the model's vocab), got min {lo}, max {hi}")
    # The prediction at position t is for token t + 1; the last position has no target (dummy 0, dropped).
    targets = torch.cat([input_ids[:, 1:], input_ids.new_zeros(B, 1)], dim=1)  # (B, T)
    logp_next, ent_next = _ChunkedLogSoftmaxGather.apply(
        logits.reshape(B * T, V), targets.reshape(B * T), float(temperature), chunk, with_entropy)
    logp = F.pad(logp_next.view(B, T)[:, :-1], (1, 0))                # (B, T), logp[:, 0] = 0
    if not with_entropy:
        return logp
    return logp, F.pad(ent_next.view(B, T)[:, :-1], (1, 0))            # (B, T)


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
