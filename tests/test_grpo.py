"""Tests for grpo.py: advantages, log-probs from the hidden states, and the masked GRPO loss (CPU, a few seconds).

The loss is checked against a plain-Python float64 transcription of the formula, on hand-worked cases,
and on the invariants the trainer relies on: masked tokens get exactly zero gradient, ratio ≡ 1 on-policy,
micro-batch splitting with the global token count leaves the gradient unchanged. token_logprobs is checked
on real tiny Qwen2 models against the naive log_softmax of the full logits, gradients of every parameter included.
"""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
import transformers

from grpo import group_advantages, grpo_loss, loss_mask, nonzero_groups
from logprobs import token_logprobs


def tiny_qwen(seed=0, tied=False):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                                      tie_word_embeddings=tied)
    return transformers.Qwen2ForCausalLM(config).float()


def keep_lm_head_input(model):
    """Captures lm_head's input, the final hidden states (B, T, H), and retains its gradient."""
    captured = {}

    def hook(module, args):
        if args[0].requires_grad:
            args[0].retain_grad()
        captured["hidden"] = args[0]

    model.lm_head.register_forward_pre_hook(hook)
    return captured


def naive_logprobs(logits, ids, temperature):
    """log_softmax over the full fp64 (B, T, V), shifted so that out[:, t] scores ids[:, t]; also entropy."""
    logsm = F.log_softmax(logits.double() / temperature, dim=-1)
    out = torch.zeros(ids.shape, dtype=torch.float64)
    out[:, 1:] = logsm[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = torch.zeros(ids.shape, dtype=torch.float64)
    ent[:, 1:] = -(logsm.exp() * logsm).sum(-1)[:, :-1]
    return out, ent


def reference_loss_and_grad(logp, old, adv, mask, n_tokens, eps_low, eps_high,
                            sampler=None, cap=2.0, ref=None, beta=0.0):
    """The formula of grpo.py's docstring, token by token in Python floats; returns (loss, d loss / d logp)."""
    B, T = len(logp), len(logp[0])
    total, grad = 0.0, [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            a = adv[b] if not isinstance(adv[b], list) else adv[b][t]
            r = math.exp(logp[b][t] - old[b][t])
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            w = min(math.exp(old[b][t] - sampler[b][t]), cap) if sampler is not None else 1.0
            if r * a <= clipped * a:                      # unclipped branch is the min: gradient −w·a·r
                pg, dpg = -w * r * a, -w * r * a
            else:                                         # clipped branch: constant in logp
                pg, dpg = -w * clipped * a, 0.0
            kl = dkl = 0.0
            if ref is not None and beta > 0:
                d = ref[b][t] - logp[b][t]
                kl = math.exp(d) - d - 1                  # k3
                dkl = -math.exp(d) + 1                    # d k3 / d logp (|d| < 20 here)
            total += pg + beta * kl
            grad[b][t] = (dpg + beta * dkl) / n_tokens
    return total / n_tokens, grad


# ----------------------------------------------------------------------------- grpo_loss

@pytest.mark.parametrize("eps_high", [0.2, 0.28])
@pytest.mark.parametrize("use_kl", [False, True])
@pytest.mark.parametrize("use_tis", [False, True])
@pytest.mark.parametrize("adv_per_token", [False, True])
def test_loss_matches_float64_reference(eps_high, use_kl, use_tis, adv_per_token):
    g = torch.Generator().manual_seed(1)
    B, T = 3, 11
    old = -2.0 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()  # ratios 0.5..2
    sampler = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn((B, T) if adv_per_token else (B,), generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    n_tokens = int(mask.sum()) + 5                        # as if other micro-batches held 5 more tokens
    kw = dict(clip_eps_low=0.2, clip_eps_high=eps_high, sampler_logp=sampler if use_tis else None,
              tis_cap=2.0, ref_logp=ref if use_kl else None, kl_beta=0.05 if use_kl else 0.0)
    loss, stats = grpo_loss(logp, old, adv, mask, n_tokens=n_tokens, **kw)
    loss.backward()
    want, want_grad = reference_loss_and_grad(
        logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), n_tokens, 0.2, eps_high,
        sampler.tolist() if use_tis else None, 2.0, ref.tolist() if use_kl else None, 0.05 if use_kl else 0.0)
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert torch.allclose(logp.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert 0 < stats["clip_frac"] < 1                     # the random ratios do reach the clip
    assert stats["tokens"] == mask.sum().item()
    assert stats["masked_frac"] == pytest.approx(1 - mask.double().mean().item())


def test_hand_computed_2x3():
    # old_logp = 0, so r = exp(logp); ε = 0.2; A = (1, −2); the masked r = 0.5 must not count.
    #   row 0, A = 1:  r=1.0 → −min(1.0, 1.0) = −1.0;  r=1.5 → −min(1.5, 1.2) = −1.2 (clipped);
    #                  r=0.5 is masked
    #   row 1, A = −2: r=0.9 → −min(−1.8, −1.8) = 1.8;  r=1.1 → −min(−2.2, −2.2) = 2.2;
    #                  r=2.0 → −min(−4.0, −2.4) = 4.0 (the unclipped term is the min: not clipped)
    #   loss = (−1.0 − 1.2 + 1.8 + 2.2 + 4.0) / 5 tokens = 5.8 / 5 = 1.16;  clip_frac = 1/5
    ratio = torch.tensor([[1.0, 1.5, 0.5], [0.9, 1.1, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, stats = grpo_loss(ratio.log(), torch.zeros(2, 3, dtype=torch.float64),
                            torch.tensor([1.0, -2.0], dtype=torch.float64), mask, n_tokens=5)
    assert loss.item() == pytest.approx(1.16, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(0.2)
    assert (stats["ratio_min"], stats["ratio_max"]) == pytest.approx((0.9, 2.0))
    assert stats["masked_frac"] == pytest.approx(1 / 6)


def test_hand_computed_tis_and_kl():
    # r = 1 everywhere, A = 1, so pg = −1 per token before TIS.
    #   TIS: w = min(exp(old − sampler), 2) = (exp(0), exp(log 4) capped) = (1, 2)  → pg = (−1, −2)
    #   KL:  δ = ref − logp = (log 2, 0) → k3 = (2 − log 2 − 1, 0) = (0.306853, 0); β = 0.1
    #   loss = (−1 + 0.0306853 − 2) / 2 = −1.4846574
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    sampler = torch.tensor([[0.0, -math.log(4)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(2), 0.0]], dtype=torch.float64)
    loss, stats = grpo_loss(zeros, zeros, torch.ones(1, dtype=torch.float64), torch.ones(1, 2), n_tokens=2,
                            sampler_logp=sampler, tis_cap=2.0, ref_logp=ref, kl_beta=0.1)
    assert loss.item() == pytest.approx((-1 + 0.1 * (1 - math.log(2)) - 2) / 2, abs=1e-12)
    assert stats["tis_mean"] == pytest.approx(1.5)
    assert stats["tis_capped_frac"] == pytest.approx(0.5)
    assert stats["kl"] == pytest.approx((1 - math.log(2)) / 2)


def test_on_policy_ratio_is_one_and_gradient_is_reinforce():
    g = torch.Generator().manual_seed(2)
    logp = (-1.0 - torch.rand(4, 9, generator=g)).requires_grad_()
    adv = torch.randn(4, generator=g)
    mask = (torch.rand(4, 9, generator=g) < 0.6).float()
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask, n_tokens=mask.sum())
    loss.backward()
    assert stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0
    assert stats["clip_frac"] == 0.0
    # ∇L = −A · m / N_tok: REINFORCE with the group baseline.
    assert torch.allclose(logp.grad, -adv[:, None] * mask / mask.sum(), atol=1e-7)


def test_masked_positions_are_ignored():
    g = torch.Generator().manual_seed(3)
    B, T = 2, 8
    old = -1.5 + 0.2 * torch.randn(B, T, generator=g)
    base = old + 0.2 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, 5:] = False
    kw = dict(n_tokens=int(mask.sum()), clip_eps_high=0.28, tis_cap=2.0, kl_beta=0.01)
    adv = torch.tensor([0.7, -1.1])

    def run(old_, sampler_, ref_):
        logp = base.clone().requires_grad_()
        loss, stats = grpo_loss(logp, old_, adv, mask, sampler_logp=sampler_, ref_logp=ref_, **kw)
        loss.backward()
        return loss.item(), logp.grad, stats

    loss1, grad1, stats1 = run(old, old - 0.1, old + 0.1)
    wild = torch.tensor([float("-inf"), float("nan"), 1e4, -1e4] * 4).view(B, T)
    junk = lambda x: torch.where(mask, x, wild)          # noqa: E731
    loss2, grad2, stats2 = run(junk(old), junk(old - 0.1), junk(old + 0.1))
    assert loss1 == loss2
    assert torch.equal(grad1, grad2)
    assert torch.isfinite(grad2).all() and (grad2[~mask] == 0).all() and (grad2[mask] != 0).all()
    assert stats1 == stats2


def test_loss_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(x, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), n_tokens=6)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x, x, torch.zeros(3), torch.ones(2, 3), n_tokens=6)
    with pytest.raises(ValueError, match="n_tokens"):
        grpo_loss(x, x, torch.zeros(2), torch.zeros(2, 3), n_tokens=0)
    with pytest.raises(ValueError, match="global count"):
        grpo_loss(x, x, torch.zeros(2), torch.ones(2, 3), n_tokens=4)
    with pytest.raises(ValueError, match="clip_eps_low"):
        grpo_loss(x, x, torch.zeros(2), torch.ones(2, 3), n_tokens=6, clip_eps_low=1.0)


# ----------------------------------------------------------------------------- gradients through a model

def test_masked_tokens_get_zero_gradient_in_a_real_model():
    # No (B, T, V) logits exist any more; lm_head's input, the hidden state of row t, feeds only the prediction
    # of token t + 1, so its gradient row is zero exactly when that prediction's logit gradient is.
    model = tiny_qwen()
    captured = keep_lm_head_input(model)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 96, (3, 20), generator=g)
    mask = torch.rand(3, 20, generator=g) < 0.5
    mask[:, 0] = False                                    # position 0 has no prediction
    logp = token_logprobs(model, ids, temperature=0.9)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -0.5, 2.0]), mask, n_tokens=int(mask.sum()),
                        sampler_logp=logp.detach() - 0.05, ref_logp=logp.detach() + 0.1, kl_beta=0.1)
    loss.backward()
    grad = captured["hidden"].grad                        # (B, T, H); row t − 1 predicts token t
    trained = torch.zeros(3, 20, dtype=torch.bool)
    trained[:, :-1] = mask[:, 1:]
    assert (grad[~trained] == 0).all()                    # exactly zero, not just small
    assert (grad[trained].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("n_micro", [2, 4])
def test_micro_batches_with_global_token_count_give_the_same_gradient(n_micro):
    g = torch.Generator().manual_seed(5)
    B, T = 4, 16
    ids = torch.randint(0, 96, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[:, 0] = False
    mask[3] = False                                       # one row with nothing to train on
    adv = torch.tensor([0.5, -1.0, 1.5, 0.3])
    sampler_shift = 0.2 * torch.randn(B, T, generator=g)
    n_tokens = int(mask.sum())

    def grads(n_parts):
        model = tiny_qwen(seed=7)
        for rows in torch.arange(B).chunk(n_parts):
            logp = token_logprobs(model, ids[rows])
            old = logp.detach()
            loss, _ = grpo_loss(logp, old, adv[rows], mask[rows], n_tokens=n_tokens, clip_eps_high=0.28,
                                sampler_logp=old + sampler_shift[rows], ref_logp=old - 0.1, kl_beta=0.01)
            loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    whole, split = grads(1), grads(n_micro)
    assert any(g.abs().max() > 1e-4 for g in whole.values())
    for name in whole:
        assert torch.allclose(whole[name], split[name], rtol=0, atol=1e-6), name


# ----------------------------------------------------------------------------- token_logprobs

@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("chunk", [1, 3, 5, 1000])
def test_logprobs_entropy_and_gradients_match_the_naive_float64_model(tied, temperature, chunk):
    # N = B·T = 26 rows, V = 96, 21 rows with a gradient (3 zero upstream entries, and each row's last position).
    # chunk 1, 3, 5, 1000 -> forward row chunks of 1, 3, 5, 26 (3 and 5 do not divide 26) and backward vocab
    # slices of chunk·V // 21 = 4, 13, 22, 96 columns (13 and 22 do not divide 96).
    model = tiny_qwen(tied=tied).double()
    naive = copy.deepcopy(model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ours, theirs = keep_lm_head_input(model), keep_lm_head_input(naive)
    g = torch.Generator().manual_seed(6)
    B, T = 2, 13
    ids = torch.randint(0, 96, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g, dtype=torch.float64)
    upstream[0, 4:7] = 0                                  # rows with no gradient (the backward skips them)
    logp, ent = token_logprobs(model, ids, temperature=temperature, chunk=chunk, with_entropy=True)
    (logp * upstream).sum().backward()
    want, want_ent = naive_logprobs(naive(input_ids=ids).logits, ids, temperature)   # full (B, T, V) logits
    (want * upstream).sum().backward()
    assert logp.shape == (B, T) and (logp[:, 0] == 0).all()
    assert torch.allclose(logp, want, rtol=0, atol=1e-12)
    assert torch.allclose(ent, want_ent, rtol=0, atol=1e-12) and not ent.requires_grad
    assert torch.allclose(ours["hidden"].grad, theirs["hidden"].grad, rtol=0, atol=1e-12)
    # Every parameter: lm_head's weight (with the embedding's gradient added when tied) and the layers below.
    for (name, p), q in zip(model.named_parameters(), naive.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12), name
    assert model.lm_head.weight.grad.abs().max() > 1e-3


def test_bf16_weights_give_fp32_logprobs_and_bf16_gradients_close_to_fp32():
    model = tiny_qwen().bfloat16()
    captured = keep_lm_head_input(model)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 96, (3, 40), generator=g)
    upstream = torch.randn(3, 40, generator=g)
    logp = token_logprobs(model, ids, temperature=1.3, chunk=5)   # 24 vocab slices of 4
    (logp * upstream).sum().backward()
    # The reference: the same bf16 hidden states and weight, upcast, through a float64 log_softmax.
    hidden = captured["hidden"].detach().double().requires_grad_()
    weight = model.lm_head.weight.detach().double().requires_grad_()
    want, _ = naive_logprobs(hidden @ weight.T, ids, 1.3)
    (want * upstream.double()).sum().backward()
    assert logp.dtype == torch.float32
    assert torch.allclose(logp.double(), want, rtol=0, atol=2e-3)           # the bf16 logits' rounding
    for ours, ref in ((captured["hidden"].grad, hidden.grad), (model.lm_head.weight.grad, weight.grad)):
        assert ours.dtype == torch.bfloat16
        assert (ours.double() - ref).norm() < 1e-2 * ref.norm()              # bf16 precision, not an error


def test_token_logprobs_on_an_fp32_model_restores_lm_head_after_a_call_and_after_an_error():
    model = tiny_qwen()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(9))
    logp = token_logprobs(model, ids, temperature=1.3, chunk=5)
    assert "forward" not in vars(model.lm_head)           # the class's nn.Linear.forward again
    with torch.no_grad():
        logits = model(input_ids=ids).logits              # (B, T, V): lm_head is itself again
        want, _ = naive_logprobs(logits, ids, 1.3)
    assert logits.shape == (2, 12, 96) and logp.dtype == torch.float32
    assert torch.allclose(logp.detach().double(), want, atol=1e-5)

    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = model.model.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        token_logprobs(model, ids)
    handle.remove()
    assert "forward" not in vars(model.lm_head)


def test_token_logprobs_errors():
    model = tiny_qwen()
    with pytest.raises(ValueError, match="vocab"):
        token_logprobs(model, torch.tensor([[1, 2, 96, 3]]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, torch.zeros(1, 4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="chunk"):
        token_logprobs(model, torch.zeros(1, 4, dtype=torch.long), chunk=0)
    logits_only = lambda **kwargs: types.SimpleNamespace(logits=torch.zeros(1, 4, 10))   # noqa: E731
    with pytest.raises(ValueError, match="output embedding"):
        token_logprobs(logits_only, torch.zeros(1, 4, dtype=torch.long))

    class SoftCapped(torch.nn.Module):                   # rescales lm_head's output, as Gemma 2 does
        def __init__(self):
            super().__init__()
            self.embed, self.lm_head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, **kwargs):
            return types.SimpleNamespace(logits=30 * torch.tanh(self.lm_head(self.embed(input_ids)) / 30))

    capped = SoftCapped()
    with pytest.raises(ValueError, match="unchanged"):
        token_logprobs(capped, torch.zeros(1, 4, dtype=torch.long))
    assert "forward" not in vars(capped.lm_head)


# ----------------------------------------------------------------------------- advantages and masks

def test_group_advantages_std():
    # group (1, 0, 0, 1): mean 0.5, unbiased std sqrt(4 · 0.25 / 3) = 0.57735 → A = ±0.5 / 0.57735 = ±0.866025
    adv = group_advantages([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3], group_size=4)
    assert adv.dtype == torch.float32 and adv.shape == (8,)
    assert adv[:4].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))          # equal rewards: exactly zero
    # mean(0.1, 0.1, 0.1) is one ulp off 0.1 in float64; the result must still be exactly zero
    assert torch.equal(group_advantages([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], 3), torch.zeros(6))


def test_group_advantages_none_scale_is_dr_grpo():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.2, 0.6, -1.0, -1.0]), group_size=2, scale="none")
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.2, 0.2, 0.0, 0.0])


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages([1.0, 0.0, 1.0, 0.0, 1.0], group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages([1.0, 0.0], group_size=1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages([1.0, 0.0], group_size=2, scale="mean")
    with pytest.raises(ValueError, match="finite"):
        group_advantages([1.0, float("nan")], group_size=2)


def test_nonzero_groups_marks_droppable_groups():
    adv = group_advantages([1.0, 1.0, 0.0, 1.0, 0.5, 0.5], group_size=2)
    assert nonzero_groups(adv, 2).tolist() == [False, False, True, True, False, False]
    with pytest.raises(ValueError, match="multiple"):
        nonzero_groups(adv, 4)


def test_loss_mask_switches_between_policy_and_response_tokens():
    policy = torch.tensor([[0, 1, 1, 0, 0, 1]])           # prompt, 2 sampled, 2 tool tokens, 1 sampled
    response = torch.tensor([[0, 1, 1, 1, 1, 1]])
    assert torch.equal(loss_mask(policy, response), policy)
    assert torch.equal(loss_mask(policy, response, use_loss_mask=False), response)
    with pytest.raises(ValueError, match="same shape"):
        loss_mask(policy, response[:, :5])


class RecordingOptimizer(torch.optim.Optimizer):
    """Keeps the gradients it is asked to step with (and changes nothing), so grpo_update's gradient can be read."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]


@pytest.mark.parametrize("use_loss_mask", [False, True])
def test_without_the_loss_mask_tool_tokens_get_the_plain_policy_gradient(use_loss_mask):
    """grpo_update through training_rows, as train.py calls it, on a trajectory laid out as the rollout makes it:
    sampled tokens with the engine's log-probs, tool tokens with mask 0 and log-prob 0.0. Under --no-loss-mask the
    gradient must be the plain policy gradient -Σ A·∇log π / N over every response token (TIS weight 1 at the tool
    tokens, which the engine never sampled; before, their weight was min(π, 2) = π); with the mask, over the sampled
    tokens only."""
    from grpo import grpo_update, training_rows
    model = tiny_qwen(seed=3)
    torch.manual_seed(0)
    prompt, ids = torch.randint(0, 50, (4,)).tolist(), torch.randint(0, 50, (12,)).tolist()
    mask = [1] * 4 + [0] * 5 + [1] * 3                                  # sampled, a tool response, sampled
    with torch.no_grad():
        true_logp = token_logprobs(model, torch.tensor([prompt + ids]))[0, len(prompt):].tolist()
    traj = types.SimpleNamespace(prompt_ids=prompt, ids=ids, mask=mask,
                                 logprobs=[lp if m else 0.0 for lp, m in zip(true_logp, mask)])   # TIS w = 1 at sampled
    advantage = 0.7
    rows = training_rows([traj], [advantage], use_loss_mask=use_loss_mask)
    trained = [0] * len(prompt) + ([1] * len(ids) if not use_loss_mask else mask)
    assert rows[0].mask == trained and rows[0].sampled == [0] * len(prompt) + mask
    optimizer = RecordingOptimizer(model.parameters())
    grpo_update(model, optimizer, rows, n_tokens=sum(trained), pad_id=0, micro_batch_tokens=4096, temperature=1.0,
                grad_clip=1e9)                                          # no clipping: the raw gradient
    model.zero_grad()
    logp = token_logprobs(model, torch.tensor([prompt + ids]))[0]
    (-(advantage * logp * torch.tensor(trained, dtype=logp.dtype)).sum() / sum(trained)).backward()
    for got, param in zip(optimizer.grads, model.parameters()):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-7)
