"""One process per GPU: the few collectives train.py needs, FSDP2 wrapping, weight gathering, atomic checkpoints.

The layout of training_design.md §2: under `torchrun` every rank keeps an FSDP2-sharded policy (`fully_shard`
per decoder layer, then the root; bf16 parameters, fp32 gradient reduction, activation checkpointing), gathers
full tensors one parameter at a time to push into its colocated rollout engine, and writes checkpoints that a
run killed at any moment cannot corrupt. Under plain `python` there is one rank and no collective runs. On CPU
(gloo) the ranks keep full models and sum gradients by hand: FSDP2 on gloo does not average them correctly
(pytorch#162338).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


class Dist:
    """Rank, world size, device and the two collectives the loop needs. `python` = one rank."""

    def __init__(self):
        self.on = "RANK" in os.environ
        self.cuda = torch.cuda.is_available()
        if self.on:
            dist.init_process_group("cuda:nccl,cpu:gloo" if self.cuda else "gloo")
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if self.cuda else "cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)

    def sum(self, value: float) -> float:
        return self.sums([value])[0] if self.on else value

    def sums(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks, in one all-reduce (every rank passes the same number of values)."""
        if not self.on:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        if not self.on:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def prepare_model(model, d: Dist):
    """FSDP2 on GPUs (per decoder layer, then the root); a plain model on CPU or a single process."""
    if d.on and d.cuda:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model.to(d.device)


def reduce_gradients(model, d: Dist) -> None:
    """CPU multi-rank: sum gradients across ranks by hand (the loss is already a global token-mean)."""
    if d.on and not d.cuda:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)


def sft_collectives(model, d: Dist) -> dict:
    """sft.train_sft's keyword arguments for this layout: the step's token count summed over ranks, and the
    gradients summed too: FSDP averages them (so each rank's loss is scaled by the world size), the CPU path sums
    them by hand. Without it each CPU rank would train on its own rows and the ranks would drift apart."""
    fsdp = d.on and d.cuda
    return dict(rank=d.rank, all_reduce=dist.all_reduce if d.on else None, loss_scale=d.world if fsdp else 1,
                reduce_gradients=lambda: reduce_gradients(model, d))


def named_full_tensors(model):
    """(name, full bf16 tensor) pairs for the engine: gathers FSDP2 shards one parameter at a time."""
    for name, p in model.named_parameters():
        t = p.detach()
        yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t).to(torch.bfloat16)


def full_state_dict(model, d: Dist) -> dict:
    """The model's full state dict on rank 0 (gathered from FSDP2 shards, offloaded to CPU)."""
    if d.on and d.cuda:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(path: Path, model, tokenizer, d: Dist, *, optimizer=None, state: dict | None = None) -> None:
    """Write an HF model + tokenizer (+ optimizer, RNG and loop state) to `path` atomically.

    Every rank writes into `path.tmp` (the optimizer and RNG states are per rank); after a barrier rank 0
    renames it to `path`, so a run killed at any moment leaves either the old or the new checkpoint.
    """
    tmp = path.with_name(path.name + ".tmp")
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    sd = full_state_dict(model, d)
    if d.on:
        dist.barrier()
    if d.rank == 0:
        unwrapped = getattr(model, "module", model)
        unwrapped.save_pretrained(tmp / "model", state_dict=sd)
        tokenizer.save_pretrained(tmp / "model")
        (tmp / "state.json").write_text(json.dumps(state or {}))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if d.cuda else None}, tmp / f"rank{d.rank}.pt")
    if d.on:
        dist.barrier()
    if d.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if d.on:
        dist.barrier()


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted(p for p in (out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    return steps[-1] if steps else None
