"""Run by tests/test_train.py: one GRPO update, or one SFT step, on a fixed global batch, on 1 process or torchrun
(FSDP2; `grpo-hsdp`: the 2-D mesh of multi-node runs, replicated across ranks, sharded within each; `grpo-kl`: a
KL reference model, one row per micro-batch and 2 rows on rank 0 against 6 on rank 1, so rank 0 pads).

Writes the updated parameters to OUT (every rank to OUT.rank<r>), so the test can compare the 2-rank update with
the 1-rank one and the ranks with each other. `sft`: under torchrun rank r trains on copies of example r
(sft.train_sft with distributed.sft_collectives, as train.py); on 1 process the same step is taken by hand on
the union of the ranks' rows.
"""
import sys

import torch

import toy_model
import toy_world as tw
from retrievers import BM25Retriever
from tools import Tools
from search_env import rollout
from engine import SamplingParams
from toy_world import ToyTeacherEngine
from distributed import prepare_model, sft_collectives
from sft import sft_step, train_sft
from distributed import Dist
from grpo import grpo_update, training_rows


def main(workdir: str, out: str, mode: str) -> None:
    d = Dist(shard_size=1 if mode == "grpo-hsdp" else None)     # HSDP: each rank a shard group of its own
    world = tw.build_world(0, tw.WorldConfig(n_train=40, n_dev=10, n_test=20, n_extra_people=20))
    tokenizer = tw.build_tokenizer(world, cache_dir=workdir)
    tools = Tools(BM25Retriever(f"{workdir}/corpus.jsonl"), topk=tw.TOPK, tokenizer=tokenizer)
    questions = world.splits["train"][:8]
    teacher = ToyTeacherEngine(tokenizer, questions, premature_rate=0.5, wrong_search_rate=0.3)
    trajs = rollout(teacher, tools, questions, tokenizer=tokenizer, params=SamplingParams(), system=tw.SYSTEM,
                    tool_names=tw.TOOLS)
    if mode == "sft":
        return sft(d, tokenizer, trajs, out)
    advantages = torch.linspace(-1.5, 1.5, len(trajs))              # any fixed advantages will do
    share = len(trajs) // d.world                                   # whole groups (G = 1 here) per rank
    mine = slice(d.rank * share, (d.rank + 1) * share)
    if mode == "grpo-kl" and d.on:   # 2 rows on rank 0, 6 on rank 1: rank 0 pads its micro-batch count
        mine = slice(0, 2) if d.rank == 0 else slice(2, None)
    model = prepare_model(toy_model.build_tiny_model(tokenizer, seed=0), d)
    ref = None
    if mode == "grpo-kl":            # a KL reference that is not the policy: its gradient counts
        ref = prepare_model(toy_model.build_tiny_model(tokenizer, seed=1).requires_grad_(False).eval(), d,
                            trainable=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rows = training_rows(trajs[mine], advantages[mine].tolist())      # as train.py's step makes and passes them
    stats = grpo_update(model, optimizer, rows, n_tokens=d.sum(sum(sum(r.mask) for r in rows)),
                        pad_id=tokenizer.pad_token_id, micro_batch_tokens=1 if ref else 1200, temperature=1.0,
                        kl_beta=0.1 if ref else 0.0, ref_model=ref, loss_scale=d.world if d.fsdp else 1,
                        max_count=d.max)
    torch.save({"params": {k: full(v) for k, v in model.named_parameters()}, "stats": stats}, f"{out}.rank{d.rank}")


def sft(d: Dist, tokenizer, trajs, out: str) -> None:
    examples = [(t.prompt_ids + t.ids, [0] * len(t.prompt_ids) + t.mask) for t in trajs[:2]]
    model = prepare_model(toy_model.build_tiny_model(tokenizer, seed=0), d)
    if d.on:                                                        # rank r: 3 copies of example r
        train_sft(model, [examples[d.rank]], pad_id=tokenizer.pad_token_id, steps=1, batch_size=3, lr=1e-3,
                  log=None, **sft_collectives(d))
    else:                                                           # train_sft's step on all 6 rows, by hand
        rows = [examples[0]] * 3 + [examples[1]] * 3
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        sft_step(model, rows, pad_id=tokenizer.pad_token_id, micro_batch_tokens=8192,
                 n_tokens=sum(sum(m) for _, m in rows))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    torch.save({"params": {k: full(v) for k, v in model.named_parameters()}, "stats": {}}, f"{out}.rank{d.rank}")


def full(p):
    t = p.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "grpo")
