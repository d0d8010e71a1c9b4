"""Run by tests/test_train.py: one GRPO update on a fixed global batch, on 1 process or under torchrun.

Writes the updated parameters to OUT (rank 0), so the test can compare the 2-rank update with the 1-rank one.
"""
import argparse
import sys

import torch

import toy_world as tw
from retrievers import BM25Retriever
from search_env import Tools, rollout
from engine import SamplingParams
from sft import ToyTeacherEngine
from train import Dist, grpo_update


def main(workdir: str, out: str) -> None:
    d = Dist()
    world = tw.build_world(0, tw.WorldConfig(n_train=40, n_dev=10, n_test=20, n_extra_people=20))
    tokenizer = tw.build_tokenizer(world, cache_dir=workdir)
    tools = Tools(BM25Retriever(f"{workdir}/corpus.jsonl"), topk=tw.TOPK, tokenizer=tokenizer)
    questions = world.splits["train"][:8]
    teacher = ToyTeacherEngine(tokenizer, questions, premature_rate=0.5, wrong_search_rate=0.3)
    trajs = rollout(teacher, tools, questions, tokenizer=tokenizer, params=SamplingParams(), system=tw.SYSTEM,
                    tool_names=tw.TOOLS)
    advantages = torch.linspace(-1.5, 1.5, len(trajs))              # any fixed advantages will do
    share = len(trajs) // d.world                                   # whole groups (G = 1 here) per rank
    mine = slice(d.rank * share, (d.rank + 1) * share)
    model = tw.build_tiny_model(tokenizer, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    args = argparse.Namespace(no_loss_mask=False, micro_batch_tokens=1200, temperature=1.0, kl_beta=0.0)
    stats = grpo_update(model, optimizer, trajs[mine], advantages[mine], args, d, pad_id=tokenizer.pad_token_id)
    if d.rank == 0:
        torch.save({"params": {k: v.detach() for k, v in model.named_parameters()}, "stats": stats}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
