"""Checkpoint integrity, in-process: every checkpoint and export carries a manifest (size + sha256 of each file);
every kind of damage to every kind of file is named and --resume's walk takes the previous intact source; the
checkpoint it takes loads what was saved; metrics.jsonl keeps each step once. End to end (a SIGKILL, damaged
checkpoints under train.py --resume, a damaged SFT export): tests/test_train.py."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import run_log
import run_setup
import toy_model
import toy_world as tw
import train
from distributed import MANIFEST, Dist, export_hf, load_checkpoint, save_checkpoint, verify_checkpoint, write_manifest

FILES = {"state.json": "checkpoints/step_000002/state.json", "rng": "checkpoints/step_000002/rng_rank0.pt",
         "dcp shard": "checkpoints/step_000002/dcp/__0_0.distcp", "dcp metadata": "checkpoints/step_000002/dcp/.metadata",
         "manifest": f"checkpoints/step_000002/{MANIFEST}", "export safetensors": "sft_model/model/model.safetensors"}


def damage(f: Path, how: str) -> None:
    """64 bytes flipped mid-file (size unchanged), the file cut to half, or the file gone."""
    data = bytearray(f.read_bytes())
    if how == "overwrite":
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        f.write_bytes(bytes(data))
    elif how == "truncate":
        f.write_bytes(bytes(data[:len(data) // 2]))
    else:
        f.unlink()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(the toy tokenizer, a pristine --out folder with steps 1 and 2 and the weights saved at each)."""
    world = tw.build_world(0, tw.WorldConfig(n_train=10, n_dev=2, n_test=2, n_extra_people=2))
    tokenizer = tw.build_tokenizer(world)
    out = tmp_path_factory.mktemp("pristine")
    return tokenizer, out, make_folder(out, tokenizer)[1]


def run_folder(out: Path, toy) -> tuple[Dist, dict]:
    """A copy of the pristine folder at `out` -> (Dist, the model's weights at each step)."""
    shutil.rmtree(out)
    shutil.copytree(toy[1], out)
    return Dist(), toy[2]


def make_folder(out: Path, tokenizer, steps=(1, 2)) -> tuple[Dist, dict]:
    """An --out folder as train.py leaves it: the SFT export and checkpoints step_N with Adam state -> (Dist, the
    model's weights at each step)."""
    d, model = Dist(), toy_model.build_tiny_model(tokenizer)
    export_hf(out / "sft_model" / "model", model, tokenizer, d)
    optimizer, saved = torch.optim.AdamW(model.parameters(), lr=1e-2), {}
    for step in steps:
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
        optimizer.step()
        save_checkpoint(out / "checkpoints" / f"step_{step:06d}", model, d, optimizer=optimizer,
                        state={"step": step})
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return d, saved


@pytest.mark.parametrize("how", ["overwrite", "truncate", "delete"])
@pytest.mark.parametrize("kind", list(FILES))
def test_any_damaged_file_is_named_and_resume_takes_the_previous_intact_source(tmp_path, toy, kind, how):
    d, _ = run_folder(tmp_path, toy)
    sources = [tmp_path / "checkpoints" / "step_000002", tmp_path / "checkpoints" / "step_000001",
               tmp_path / "sft_model" / "model"]
    assert [verify_checkpoint(p, d) for p in sources] == [None] * 3
    damage(tmp_path / FILES[kind], how)
    hit = sources[2] if kind.startswith("export") else sources[0]
    reason = verify_checkpoint(hit, d)
    name = Path(FILES[kind]).relative_to(hit.relative_to(tmp_path)).as_posix()
    assert reason is not None and name in reason.split(":")[0] and "\n" not in reason, reason
    if kind != "manifest":
        assert {"overwrite": "sha256 differs from the manifest's", "truncate": " bytes, the manifest says ",
                "delete": ": missing"}[how] in reason, reason
    damaged = []
    assert run_setup.resume_point(tmp_path, d, damaged) == (sources[1] if hit == sources[0] else sources[0])
    assert damaged == ([(hit, reason)] if hit == sources[0] else [])   # the newest intact one is found first


def test_nothing_intact_stops_in_one_line_naming_each_and_nothing_at_all_is_a_fresh_start(tmp_path, toy):
    d, _ = run_folder(tmp_path, toy)
    damage(tmp_path / "checkpoints" / "step_000002" / "rng_rank0.pt", "overwrite")
    damage(tmp_path / "checkpoints" / "step_000001" / "dcp" / ".metadata", "delete")
    damaged = []
    assert run_setup.resume_point(tmp_path, d, damaged) == tmp_path / "sft_model" / "model" and len(damaged) == 2
    damage(tmp_path / "sft_model" / "model" / "config.json", "truncate")
    with pytest.raises(SystemExit) as e:
        run_setup.resume_point(tmp_path, d, [])
    message = str(e.value)
    assert message.startswith(f"error: --resume: nothing intact to resume from in {tmp_path}: ") and "\n" not in message
    for source in ("checkpoints/step_000002", "checkpoints/step_000001", "sft_model/model"):
        assert f"{tmp_path / source} is damaged (" in message, message
    assert run_setup.resume_point(tmp_path / "fresh", d, []) is None


def test_a_digit_changed_in_the_manifest_and_an_unlisted_folder_are_refused(tmp_path, toy):
    d, _ = run_folder(tmp_path, toy)
    ckpt = tmp_path / "checkpoints" / "step_000001"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"]["state.json"]["size"] += 1                          # still valid JSON, still well-formed
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    assert verify_checkpoint(ckpt, d) == f"{MANIFEST}: its own sha256 differs (damaged or edited)"
    (ckpt / MANIFEST).unlink()
    assert verify_checkpoint(ckpt, d).startswith(f"no {MANIFEST}")       # an older version's folder
    write_manifest(ckpt, d)                                               # `python distributed.py manifest FOLDER`
    assert verify_checkpoint(ckpt, d) is None


def test_the_checkpoint_resumed_from_after_damage_loads_what_was_saved(tmp_path, toy):
    d, saved = run_folder(tmp_path, toy)
    damage(tmp_path / "checkpoints" / "step_000002" / "rng_rank0.pt", "overwrite")   # the case
    source = run_setup.resume_point(tmp_path, d, [])
    model = toy_model.build_tiny_model(toy[0], seed=1)
    state = load_checkpoint(source, model, d, torch.optim.AdamW(model.parameters()))
    assert state["step"] == 1
    assert all(torch.equal(v, saved[1][k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("left, keep_until, expected", [
    ([0, 1, 2, 3], 2, [1, 2]),                      # a killed run logged step 3 after checkpoint 2
    ([0, 1, 2, 3, 2, 3, 4], 4, [1, 2, 3, 4]),       # an older version's file: steps 2-3 were redone and appended
    ([0, 1, 2], 6, [1, 2]),
    ([0, 1, 2], -1, []),                            # a fresh start
])
def test_metrics_jsonl_left_by_a_killed_or_older_run_keeps_each_step_once(tmp_path, left, keep_until, expected):
    lines = [json.dumps({"step": 0, "eval": {}}) if s == 0 else json.dumps({"step": s}) for s in left]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "rew')   # torn by the kill
    logger = run_log.Logger(tmp_path, Dist(), None, {}, keep_until=keep_until)
    logger.log({"step": max(expected, default=keep_until) + 1})
    logger.file.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r["step"] for r in records if "eval" not in r]
    assert steps == [*expected, max(expected, default=keep_until) + 1]
    assert all(a < b for a, b in zip(steps, steps[1:]))
    assert [r["step"] for r in records if "eval" in r] == ([0] if keep_until >= 0 else [])


def test_a_damaged_sft_export_is_named_as_the_kl_reference_before_any_setup(tmp_path, toy):
    """train.main resumes from the intact newest checkpoint, but its KL reference is the SFT export: checked too."""
    run_folder(tmp_path, toy)
    export = tmp_path / "sft_model" / "model"
    damage(export / "model.safetensors", "overwrite")
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "grpo", "--resume", "--kl-beta", "0.05", "--out", str(tmp_path)])
    assert str(e.value) == (f"error: --resume: {export} is damaged (model.safetensors: sha256 differs from the "
                            "manifest's); it is the KL reference of --kl-beta")


def two_ranks(folder: Path) -> None:
    """Under torchrun: a checkpoint written by 2 ranks, each hashing its share, then checked by both, intact and
    after rank 1 damages a file of its share: both ranks give the same one-line answer."""
    d = Dist()
    model = torch.nn.Linear(256, 256)
    save_checkpoint(folder / "step_000001", model, d, state={"step": 1})
    reasons = [verify_checkpoint(folder / "step_000001", d)]
    entries = json.loads((folder / "step_000001" / MANIFEST).read_text())["files"]
    if d.rank == 1:                                                       # a file only rank 1 hashes
        name = sorted(entries, key=lambda n: (-entries[n]["size"], n))[1]
        damage(folder / "step_000001" / name, "overwrite")
        print(f"damaged {name}", flush=True)
    d.barrier()
    reasons.append(verify_checkpoint(folder / "step_000001", d))
    (folder / f"rank{d.rank}.json").write_text(json.dumps(reasons))


def test_two_ranks_split_the_hashing_and_agree(tmp_path):
    import subprocess
    import sys
    from test_train import ENV
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                           __file__, str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (damaged,) = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("damaged ")]
    answers = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert answers[0] == answers[1] == [None, f"{damaged}: sha256 differs from the manifest's"], answers


if __name__ == "__main__":
    import sys
    two_ranks(Path(sys.argv[1]))
