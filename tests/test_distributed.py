"""distributed.py: loading from rank 0 into FSDP2 shards (2 CPU ranks, gloo), and DCP checkpoints: pruning, and a
damaged checkpoint named with the one to fall back to. The training loop on FSDP2 ranks, the resume on another world
size and HSDP are tested through train.py in tests/test_train.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toy_world as tw
from distributed import CheckpointError, Dist, checkpoints, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    world = tw.build_world(0, tw.WorldConfig(n_train=10, n_dev=2, n_test=2, n_extra_people=2))
    return tw.write_world(world, tmp_path_factory.mktemp("w")) / "model"   # tied embeddings, rotary buffers


def test_two_ranks_load_the_weights_rank_0_read(tiny, tmp_path):
    """Rank 1 never reads the file: it builds the model on the meta device and receives its shards and the
    buffers (the rotary inv_freq, in no state dict) from rank 0."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           str(ROOT / "tests" / "dist_load.py"), str(tiny), str(tmp_path / "load")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"load.rank{rank}", weights_only=False)
        assert result["sharded"], result                 # the FSDP2 path, not a plain model
        assert result["wrong"] == [] and result["same_logits"], result


def checkpointed_model(tmp_path, steps: int, keep: int):
    """A plain tiny model and its optimizer, checkpointed after each of `steps` optimizer steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    d = Dist()
    for step in range(1, steps + 1):
        model(torch.randn(3, 6)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        save_checkpoint(tmp_path / "checkpoints" / f"step_{step:06d}", model, d, optimizer=optimizer,
                        state={"step": step}, keep=keep)
    return model, optimizer, d


def test_a_checkpoint_restores_model_optimizer_and_rng_and_old_ones_are_pruned(tmp_path):
    model, optimizer, d = checkpointed_model(tmp_path, steps=3, keep=2)
    assert [p.name for p in checkpoints(tmp_path / "checkpoints")] == ["step_000002", "step_000003"]
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    draw = torch.rand(4)                                               # the RNG stream right after the save
    fresh, _, _ = checkpointed_model(tmp_path / "other", steps=1, keep=0)   # other weights and optimizer state
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = load_checkpoint(tmp_path / "checkpoints" / "step_000003", fresh, d, fresh_optimizer)
    assert state["step"] == 3 and state["world"] == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    assert torch.equal(torch.rand(4), draw)
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)


@pytest.mark.parametrize("damage", ["truncate", "delete_state"])
def test_a_damaged_checkpoint_is_named_with_the_previous_one(tmp_path, damage):
    model, optimizer, d = checkpointed_model(tmp_path, steps=2, keep=0)
    newest = tmp_path / "checkpoints" / "step_000002"
    if damage == "truncate":
        shard = next((newest / "dcp").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (newest / "state.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(newest, model, d, optimizer)
    assert str(newest) in str(e.value) and str(tmp_path / "checkpoints" / "step_000001") in str(e.value)
    load_checkpoint(tmp_path / "checkpoints" / "step_000001", model, d, optimizer)   # the previous one loads
