"""Loss-masked GRPO: group advantages, the clipped policy loss, and one optimizer step on a rollout batch.

GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300) drops PPO's value network: each prompt is answered G
times, and a trajectory's advantage is its reward measured against the other G − 1 answers to the same
prompt. Every policy-sampled token of trajectory i is then pushed up or down by that one number through
PPO's clipped ratio objective. Atom-Searcher (arXiv 2508.12800) trains with GRPO on DeepResearcher's
recipe (METHOD.md §1 and §4), with tool-response tokens masked out of the loss: they are context the policy reads,
not actions it took. The mask is data: search_env.rollout makes `Trajectory.mask` (1 = sampled by the policy),
`training_rows` turns it into the loss mask (`loss_mask`, where --no-loss-mask acts) in a named `Row` per
trajectory, `grpo_update` micro-batches the rows and steps the optimizer, and `grpo_loss` applies the mask in exactly
one line. Per-token log-probs come from logprobs.py.

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
   change the gradient. DeepResearcher's per-micro-batch mean does (METHOD.md §8.1).
3. TIS (Feng Yao et al., fengyao.notion.site/off-policy-rl) corrects for vLLM's log-probs differing from the
   trainer's; it is off when `sampler_logp` is None. The KL term is off when β = 0 or `ref_logp` is None
   (the default, as in TRL, DAPO and Dr. GRPO; DeepResearcher uses β = 0.001).
4. No dual clip (verl's clip_ratio_c): with one optimizer step per rollout batch (the default, METHOD.md §8.1)
   the ratio is exactly 1 and it would never act. No entropy bonus (DeepResearcher's 0.001; METHOD.md §4
   marks it optional): `token_logprobs(with_entropy=True)` gives the entropy for logging.
5. `token_logprobs` (logprobs.py) computes the per-token log-probs without materializing the (B, T, V) logits.

What is not covered: sequence-level importance weights, PPO value functions, reward normalisation across
groups, several optimizer steps per rollout batch. The caller (train.py) owns the global token count (an all-reduce)
and dropping all-zero groups (`nonzero_groups`).

Tests: `python -m pytest -q tests/test_grpo.py`. Speed and memory: `python bench/bench_grpo.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from logprobs import token_logprobs


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

    The caller drops the False rows before micro-batching (METHOD.md §8.5; DAPO's dynamic
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
    against: their gradient is then the plain policy gradient −A·∇log π, since the engine did not sample them and
    TIS gives them the neutral weight 1 (`grpo_loss`'s `sampled`; the rollout's log-prob 0.0 there would make the
    weight min(π, C) = π). Either way position 0 should be 0: it has no prediction (`token_logprobs` gives it 0.0).
    """
    if policy_mask.shape != response_mask.shape:
        raise ValueError(f"policy_mask {tuple(policy_mask.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape (B, T)")
    return policy_mask if use_loss_mask else response_mask


# ----------------------------------------------------------------------------- the loss

def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              n_tokens, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2,
              sampler_logp: torch.Tensor | None = None, tis_cap: float = 2.0, sampled: torch.Tensor | None = None,
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
    sampled:      1 where the engine sampled the token, so `sampler_logp` means something (default: `mask`). A
                  trained token it did not sample (a tool token under --no-loss-mask) gets the neutral weight 1.
    ref_logp, kl_beta: the k3 KL penalty to the reference; off when either is None / 0.

    Stats (floats, over this micro-batch's mask-1 tokens; the caller weights them by "tokens" to combine):
    loss (this micro-batch's share of the step loss), pg_loss (mean w·pg), kl (mean k3), clip_frac (tokens
    whose clipped branch is active, i.e. get no gradient), ratio_min/ratio_max (1.0 if no tokens), tis_mean,
    tis_capped_frac (w hit the cap), masked_frac (mask-0 share of all B·T positions), tokens (mask-1 count).
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    for name, x in (("old_logp", old_logp), ("mask", mask), ("sampler_logp", sampler_logp), ("ref_logp", ref_logp),
                    ("sampled", sampled)):
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
        s = m if sampled is None else m & sampled.bool()               # tokens the engine sampled, and trained
        tis = torch.exp(old - torch.where(s, sampler_logp.detach(), old)).clamp(max=tis_cap).detach()
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


# ----------------------------------------------------------------------------- one optimizer step
@dataclass(frozen=True)
class Row:
    """One trajectory as the loss sees it: every list aligned with `ids` = prompt_ids + Trajectory.ids."""
    ids: list[int]
    mask: list[int]              # 1 = trained on (loss_mask of Trajectory.mask); 0 over the prompt
    sampler_logp: list[float]    # the rollout engine's log-probs, for TIS; 0.0 where it sampled nothing
    advantage: float
    sampled: list[int]           # 1 where the engine sampled the token (Trajectory.mask); TIS acts there only


def training_rows(trajectories: list, advantages: list[float], *, use_loss_mask: bool = True) -> list[Row]:
    """The rollout's trajectories (search_env.Trajectory) and their advantages -> the rows `grpo_update` trains on:
    this is where Trajectory.mask, made by the rollout, becomes the loss mask."""
    rows = []
    for t, a in zip(trajectories, advantages, strict=True):
        P = len(t.prompt_ids)
        trained = loss_mask(torch.tensor(t.mask), torch.ones(len(t.ids), dtype=torch.long), use_loss_mask)
        rows.append(Row(t.prompt_ids + t.ids, [0] * P + trained.tolist(), [0.0] * P + t.logprobs, float(a),
                        [0] * P + t.mask))
    return rows


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (token ids, mask) rows -> input_ids, attention_mask, loss mask, each (B, T).

    Right padding lets a causal model ignore the pads (real tokens never attend to later positions), and
    the pads carry mask 0, so they touch neither loss nor token count. SFT batches go through it too.
    """
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)       # (B, T)
    attention_mask = torch.zeros_like(input_ids)
    mask = torch.zeros(len(rows), width)
    for i, (ids, m) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    return input_ids, attention_mask, mask


def micro_batches(rows: list, budget: int, length=lambda row: len(row[0])) -> list[list]:
    """Pack rows, sorted by `length` (default: of their first item, the token ids), into micro-batches of at most
    `budget` padded tokens; a row longer than the budget gets a micro-batch of its own. SFT and GRPO both use it, so
    a micro-batch's activations and logits scale with its tokens, not with its number of rows."""
    rows = sorted(rows, key=length)
    out, current = [], []
    for r in rows:
        if current and (len(current) + 1) * length(r) > budget:
            out.append(current)
            current = []
        current.append(r)
    return out + ([current] if current else [])


def grpo_update(model, optimizer, rows: list[Row], *, n_tokens: int, pad_id: int, micro_batch_tokens: int,
                temperature: float, kl_beta: float = 0.0, ref_model=None, clip_eps_low: float = 0.2,
                clip_eps_high: float = 0.2, loss_scale: float = 1.0, max_count=None, grad_clip: float = 1.0) -> dict:
    """One optimizer step on the rollout batch -> its stats (on-policy: old_logp = logp.detach(), ratio exactly 1).

    `n_tokens` is the step's mask-1 count over every rank (`grpo_loss`'s N_tok); `loss_scale` undoes a gradient
    average over the ranks (FSDP); `max_count(n)` is the largest micro-batch count over the ranks, and a rank with
    fewer runs padding micro-batches of one two-token row of mask 0 (each FSDP forward/backward, the reference
    model's too, is a collective: the same path, a zero loss). A non-finite loss or gradient skips the step
    ("skipped" 1). The micro-batches' stats are combined as sums (loss terms), min/max (ratios) or token-weighted
    means (the rest)."""
    if n_tokens == 0:                               # every group had equal rewards: nothing to learn from
        return {"loss": 0.0, "grad_norm": 0.0, "skipped": 1, "tokens": 0}
    mbs = micro_batches(rows, micro_batch_tokens, length=lambda row: len(row.ids))
    padding = [Row([pad_id, pad_id], [0, 0], [0.0, 0.0], 0.0, [0, 0])]
    if max_count is not None:
        mbs += [padding] * (max_count(len(mbs)) - len(mbs))
    device = next(model.parameters()).device
    model.train()
    stats_sum = {}
    for mb in mbs:
        input_ids, attention_mask, mask = (x.to(device) for x in collate([(r.ids, r.mask) for r in mb], pad_id))
        sampled = collate([(r.ids, r.sampled) for r in mb], pad_id)[2].to(device)   # (B, T) 1 = the engine sampled it
        sampler = torch.zeros_like(mask)                                 # (B, T) the engine's log-probs, for TIS
        for i, r in enumerate(mb):
            sampler[i, :len(r.sampler_logp)] = torch.tensor(r.sampler_logp)
        adv = torch.tensor([r.advantage for r in mb], device=device)    # (B,)
        logp = token_logprobs(model, input_ids, attention_mask, temperature=temperature)
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(ref_model, input_ids, attention_mask, temperature=temperature)
        loss, stats = grpo_loss(logp, logp.detach(), adv, mask, n_tokens=n_tokens, sampler_logp=sampler,
                                sampled=sampled, ref_logp=ref_logp, kl_beta=kl_beta, clip_eps_low=clip_eps_low,
                                clip_eps_high=clip_eps_high)
        (loss * loss_scale).backward()
        if mb is padding:
            continue
        for k, v in stats.items():
            if k in ("ratio_min", "ratio_max"):
                stats_sum[k] = (min if k == "ratio_min" else max)(stats_sum.get(k, v), v)
            else:
                summed = k in ("loss", "pg_loss", "tokens")
                stats_sum[k] = stats_sum.get(k, 0.0) + (v if summed else v * stats["tokens"])
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    finite = math.isfinite(grad_norm) and math.isfinite(stats_sum.get("loss", 0.0))   # else skip the step
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    local = max(stats_sum.get("tokens", 0.0), 1.0)
    out = {k: v if k.startswith("ratio") else v / local for k, v in stats_sum.items()
           if k not in ("loss", "pg_loss", "tokens")}
    out.update(loss=stats_sum.get("loss", 0.0), grad_norm=grad_norm, skipped=int(not finite), tokens=n_tokens)
    return out
