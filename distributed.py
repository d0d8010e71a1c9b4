"""One process per GPU under torchrun: the collectives train.py needs, FSDP2/HSDP sharding, loading, weight
streaming and checkpoints.

The layout (train.py's docstring has the whole loop): every torchrun rank keeps an FSDP2-sharded policy
(`fully_shard` per decoder layer, then the root; on GPUs bf16 compute with fp32 master weights and fp32 gradient
reduction, and activation checkpointing). Across nodes the mesh is 2-D (HSDP): parameters are sharded within a
node and replicated across nodes, so each layer's all-gather stays on the node's fast links and only the gradient
all-reduce crosses the network. Under plain `python` there is one rank, no sharding and no collective. CPU ranks
(gloo) run the very same FSDP2 code, which is how the tests check it (tests/test_distributed.py).

Memory, the reasons for each piece (README "Memory budget" has the numbers for 7B on 8 x 80 GB):
- `load_model`: rank 0 reads the weights; the other ranks build the model on the meta device and receive their
  shards by broadcast, so a node holds one host copy of the model, not one per rank.
- `named_full_tensors`: the weights for the rollout engine, gathered one parameter at a time and cast before the
  gather, so the sync never holds more than one full parameter.
- `save_checkpoint` / `load_checkpoint`: torch.distributed.checkpoint (DCP) writes each rank's shards of the
  model and optimizer; a checkpoint loads on any world size (DCP reshards), `--keep-checkpoints` prunes old ones,
  and `export_hf` writes the bf16 Hugging Face model (the SFT and the final model) that vLLM and evaluate.py read.
- `write_manifest` / `verify_checkpoint`: every checkpoint and export holds a manifest.json, written last, with
  the size and sha256 of each of its files, which train.py --resume checks before loading (bit flips, torn or
  missing files are named, never loaded). Every rank hashes its share of the files, largest first, so the time
  divides by the world size: sha256 (hashlib.file_digest) ran at 1.1 GB/s per core on the dev box (SHA-NI, a 1 GB
  file in the page cache), so a 7B checkpoint on 8 ranks (84 GB of fp32 weights and Adam state) takes ~10 s.
Our choices: the process-group timeout (train.py --dist-timeout, 120 minutes: a rank may wait that long for the
slowest rank's rollout or for rank 0 reading 15 GB of weights, and a real hang still ends); HSDP's shard group is
one node unless --shard-size says otherwise; a folder without a manifest (an older version's) is refused as
damaged, and `python distributed.py manifest FOLDER` writes one for a folder known to be intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor


class Dist:
    """Rank, world size, device, the device mesh and the few collectives the loop needs. `python` = one rank.

    `shard_size`: ranks that share one copy of the parameters (FSDP's shard group). Default: all ranks on one
    node; the world when there is one node (plain FSDP). Fewer than the world gives HSDP: shard within groups of
    `shard_size`, replicate across them."""

    def __init__(self, timeout_minutes: float = 120, shard_size: int | None = None):
        self.on = "RANK" in os.environ
        self.cuda = torch.cuda.is_available()
        if self.on:
            dist.init_process_group("cuda:nccl,cpu:gloo" if self.cuda else "gloo",
                                    timeout=timedelta(minutes=timeout_minutes))
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if self.cuda else "cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.fsdp = self.on               # every torchrun run shards, one rank included (bench/gpu_check.sh)
        self.mesh = None
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            shard = shard_size or per_node
            if shard < 1 or self.world % shard:
                raise ValueError(f"a shard group of {shard} ranks does not divide the {self.world} ranks")
            kind = "cuda" if self.cuda else "cpu"
            self.mesh = (init_device_mesh(kind, (self.world,), mesh_dim_names=("shard",)) if shard == self.world
                         else init_device_mesh(kind, (self.world // shard, shard),
                                               mesh_dim_names=("replicate", "shard")))   # HSDP

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: float) -> float:
        return self.sums([value])[0] if self.on else value

    def sums(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks, in one all-reduce (every rank passes the same number of values)."""
        if not self.on:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's value of a picklable object, in rank order, on every rank."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def max(self, value: int) -> int:
        if not self.on:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def sft_collectives(d: Dist) -> dict:
    """sft.train_sft's keyword arguments for this layout: the step's token count summed over the ranks, the
    loss scaled by the world size (FSDP averages the gradients; the loss is already a global token-mean) and the
    micro-batch count equalized (every rank must join each FSDP collective)."""
    return dict(rank=d.rank, all_reduce=dist.all_reduce if d.on else None, loss_scale=d.world if d.fsdp else 1,
                max_count=d.max)


def generation_copy(model, d: Dist):
    """An unsharded copy of the policy's architecture for HFEngine under FSDP (filled by the first weight sync):
    a sharded model cannot generate, its every forward is a collective and ranks stop at different tokens."""
    from transformers import AutoModelForCausalLM
    with torch.device(d.device):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16 if d.cuda else torch.float32)
    return copy.eval().requires_grad_(False)


def peak_memory(d: Dist, phase: str) -> dict:
    """{"mem_<phase>_gb": the largest peak of GPU memory allocated by torch on any rank since the last call} (and
    the counter reset); {} on CPU. vLLM's own pool is counted separately by vLLM: this is the trainer's memory."""
    if not d.cuda:
        return {}
    peak = d.max(int(torch.cuda.max_memory_allocated(d.device) // 2**20))
    reset_peak_memory(d)
    return {f"mem_{phase}_gb": peak / 1024}


def reset_peak_memory(d: Dist) -> None:
    if d.cuda:
        torch.cuda.reset_peak_memory_stats(d.device)


# ----------------------------------------------------------------------------- sharding and loading
def prepare_model(model, d: Dist, *, trainable: bool = True):
    """FSDP2 under torchrun (per decoder layer, then the root), a plain model on the device otherwise.

    Trainable models compute in bf16 on GPUs from fp32 master weights, reduce gradients in fp32, and recompute
    activations in the backward. A frozen model (the KL reference) is used as loaded (bf16 on GPUs)."""
    if not d.fsdp:
        return model.to(d.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy()
    if trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if d.cuda:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=d.mesh, mp_policy=mp)
    # The root (embeddings, lm_head) stays unsharded after the forward by default, for the backward that follows
    # it; a frozen model has no backward: it reshards at once (2 GB of bf16 at 7B would otherwise stay allocated).
    fully_shard(model, mesh=d.mesh, mp_policy=mp, reshard_after_forward=None if trainable else True)
    return model


def load_model(path, d: Dist, *, dtype=torch.float32, trainable: bool = True):
    """The HF model at `path`, sharded (under torchrun) and on the device; `trainable=False` freezes it.

    Under FSDP rank 0 alone reads the weights (into host memory); every rank builds the model on the meta device,
    shards it, allocates its own shards and receives them by broadcast from rank 0."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if not d.fsdp:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).requires_grad_(trainable)
        return prepare_model(model.train(trainable), d, trainable=trainable)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if d.rank == 0 else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    return shard_from_rank0(model, full, d, trainable=trainable)


def shard_from_rank0(model, full, d: Dist, *, trainable: bool = True):
    """Shard `model` (built on the meta device) and fill it with rank 0's `full` model (None on other ranks)."""
    model.requires_grad_(trainable).train(trainable)
    prepare_model(model, d, trainable=trainable)
    model.to_empty(device=d.device)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers outside every state dict (the rotary inv_freq) were left uninitialized by to_empty: rank 0's values.
    rank0 = dict(full.named_buffers()) if full is not None else {}
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if d.rank == 0:
                buf.copy_(rank0[name])
            dist.broadcast(buf, src=0)
    return model


def named_full_tensors(model, dtype=torch.bfloat16):
    """(name, full tensor in `dtype`) pairs for the rollout engine, one parameter at a time: each shard is cast
    first (in bf16, half the all-gather traffic of fp32), gathered, yielded, and freed once the engine copied it.
    Under FSDP it is a collective: every rank must consume the whole iterator, in the same order."""
    for name, p in model.named_parameters():
        t = p.detach().to(dtype)
        yield name, t.full_tensor() if isinstance(t, DTensor) else t


# ----------------------------------------------------------------------------- checkpoints and exports
class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message names it and the previous one, `reason` says what failed."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def listed_sha256(entries: dict) -> str:
    """The manifest's own hash, of its file list: a flipped digit in it is caught like one in any other file."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def shares(entries: dict, d: Dist) -> list[str]:
    """This rank's share of the files to hash: every world-th one, the largest first (one DCP shard per rank)."""
    return sorted(entries, key=lambda name: (-entries[name]["size"], name))[d.rank::d.world]


def write_manifest(folder: Path, d: Dist) -> None:
    """`folder`/manifest.json: the size and sha256 of every file under it. A collective, called once every rank's
    files are written: each rank hashes its share, rank 0 writes the manifest."""
    d.barrier()
    entries = d.broadcast({p.relative_to(folder).as_posix(): {"size": p.stat().st_size}
                           for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / MANIFEST}
                          if d.rank == 0 else None)
    for part in d.gather({name: sha256(folder / name) for name in shares(entries, d)}):
        for name, digest in part.items():
            entries[name]["sha256"] = digest
    if d.rank == 0:
        (folder / MANIFEST).write_text(json.dumps({"files": entries, "sha256": listed_sha256(entries)}, indent=1))


def read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(the manifest's file entries, None) or (None, what is wrong with it)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = manifest["files"]
        ok = (manifest["sha256"] == listed_sha256(entries)
              and all({"size", "sha256"} <= set(e) for e in entries.values()))
    except FileNotFoundError:
        return None, (f"no {MANIFEST}: an older version's or an unfinished folder; if it is known to be intact, "
                      f"`python distributed.py manifest {folder}` writes one")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{MANIFEST}: unreadable ({type(e).__name__})"
    return (entries, None) if ok else (None, f"{MANIFEST}: its own sha256 differs (damaged or edited)")


def verify_checkpoint(path: Path, d: Dist) -> str | None:
    """None when every file in `path`'s manifest (a checkpoint's or an export's) is there with its size and sha256,
    else one line naming what is wrong: a missing, resized or changed file, or a missing or damaged manifest. A
    collective: each rank hashes its share, every rank gets the same answer. Files the manifest does not list are
    not checked (nothing reads them)."""
    entries, problem = d.broadcast(read_manifest(path) if d.rank == 0 else None)
    if problem is not None:
        return problem
    mine = []
    for name in shares(entries, d):
        f, want = path / name, entries[name]
        if not f.is_file():
            mine.append(f"{name}: missing")
        elif f.stat().st_size != want["size"]:
            mine.append(f"{name}: {f.stat().st_size} bytes, the manifest says {want['size']}")
        elif sha256(f) != want["sha256"]:
            mine.append(f"{name}: sha256 differs from the manifest's")
    problems = sorted(p for part in d.gather(mine) for p in part)
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more files)" if len(problems) > 1 else "")


def export_hf(path: Path, model, tokenizer, d: Dist, dtype=torch.bfloat16) -> None:
    """The model as a Hugging Face folder in `dtype` (what vLLM and evaluate.py load), written by rank 0.

    The parameters are gathered one at a time and only rank 0 keeps them (on CPU): one bf16 copy in host memory.
    Written into `path.tmp` with its manifest, then renamed."""
    sd = {}
    for name, t in named_full_tensors(model, dtype):
        if d.rank == 0:
            sd[name] = t.cpu()
    tmp = path.with_name(path.name + ".tmp")
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")     # the trainer's config says float32
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
    write_manifest(tmp, d)
    if d.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    d.barrier()


def save_checkpoint(path: Path, model, d: Dist, *, optimizer=None, state: dict, keep: int = 0) -> None:
    """Model (+ optimizer) shards with DCP, each rank's RNG state and the loop `state` (JSON), atomically.

    Every rank writes into `path.tmp`, the manifest last; then rank 0 renames it to `path`, so a run killed at any
    moment leaves either the old or the new checkpoint. Then all but the newest `keep` checkpoints are removed
    (0: none)."""
    tmp = path.with_name(path.name + ".tmp")
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp / "dcp")
    else:
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=tmp / "dcp")
    torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if d.cuda else None},
               tmp / f"rng_rank{d.rank}.pt")
    if d.rank == 0:
        (tmp / "state.json").write_text(json.dumps({**state, "world": d.world, "optimizer": optimizer is not None}))
    write_manifest(tmp, d)
    if d.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        for old in checkpoints(path.parent)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()


def load_checkpoint(path: Path, model, d: Dist, optimizer=None) -> dict:
    """Fill the (sharded) model and, when the checkpoint has one, the optimizer from `path` -> its loop state.

    Resumes on any world size. The RNG states are restored only on the world size they were saved with (a
    bit-identical continuation); otherwise each rank keeps its seed and a line says so. It does not check the
    manifest: `verify_checkpoint` first (train.py --resume does)."""
    try:
        state = json.loads((path / "state.json").read_text())
        if optimizer is not None and state["optimizer"]:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            both = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(both, checkpoint_id=path / "dcp")
            set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
        else:
            only = {"model": get_model_state_dict(model)}
            dcp.load(only, checkpoint_id=path / "dcp")
            set_model_state_dict(model, only["model"])
        rng = torch.load(path / f"rng_rank{d.rank}.pt", weights_only=False) if state["world"] == d.world else None
    except (Exception, CheckpointException) as e:   # any unreadable part (DCP's is a BaseException): name it
        earlier = [p for p in checkpoints(path.parent) if p.name < path.name]
        hint = f"move it away to resume from {earlier[-1]}" if earlier else "no earlier checkpoint is left"
        detail = [line.strip() for line in str(e).splitlines() if line.strip()]   # DCP's: a traceback per rank
        reason = f"{type(e).__name__}: {detail[-1][:200] if detail else ''}"
        raise CheckpointError(f"{path} is damaged or incomplete ({reason}); {hint}", reason) from None
    if rng is None:
        if d.rank == 0:
            print(f"note: {path} was saved by {state['world']} ranks, this run has {d.world}: the RNG streams "
                  "start from the seed (the run continues, not bit-identically)", file=sys.stderr, flush=True)
    else:
        torch.set_rng_state(rng["torch"])
        if d.cuda and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def checkpoints(folder: Path) -> list[Path]:
    """The finished checkpoints in `folder` (step_NNNNNN), oldest first."""
    return sorted(p for p in folder.glob("step_*") if not p.name.endswith(".tmp"))


if __name__ == "__main__":   # python distributed.py manifest FOLDER: a manifest for a folder known to be intact
    if sys.argv[1:2] != ["manifest"] or len(sys.argv) != 3:
        raise SystemExit("usage: python distributed.py manifest FOLDER")
    write_manifest(Path(sys.argv[2]), Dist())
