"""Train an Atom-Searcher agent: atomic-thought SFT, then loss-masked GRPO on the curriculum-blended reward.

The whole pipeline of the paper (arXiv 2508.12800; PAPER.md §1, §4) in one loop, read top to bottom:
    SFT on teacher trajectories (sft.py)  ->  for step t:  rollout G answers per question (search_env.py)
      ->  R = -1 if malformed, else α(t)·ATR + (1-α(t))·F1   (rrm_reward.py, curriculum.py, evaluate.py)
      ->  A = (R - mean_G R) / (std_G R + 1e-6)  ->  one loss-masked GRPO step (grpo.py)  ->  sync the engine

Run it:
    python train.py                                   # CPU, 3-5 minutes: toy world -> SFT -> GRPO -> test F1
    python train.py --reward outcome                  # the same with F1 only (alpha0 = 0): the paper's ablation
    torchrun --nproc_per_node=8 train.py --model Qwen/Qwen2.5-7B-Instruct --data train.jsonl \\
        --sft-data sft.jsonl --retriever http://host:8000 --rrm-url http://judge:8001 --rrm-model Qwen/Qwen3-30B-A3B \\
        --eval-data nq.jsonl,hotpotqa.jsonl --query-cache cache.sqlite
With no --model the embedded default runs: the toy world (toy_world.py) with its tiny Qwen2, scripted-teacher SFT
data, the toy oracle as judge (rrm_reward.ToyOracleRRM) and the toy presets below; with --model the paper's
values (PAPER.md §4) are the defaults. Every flag overrides either. The README's "Real run" goes from questions to
teacher data (`python sft.py make-data`) to this command to `python evaluate.py`; tests/test_real_run.py runs
exactly that on CPU with tiny sizes. Every startup check (the model's chat template and positions, the data, the
SFT data's system prompt, the retriever, the judge and reader endpoints) runs before any expensive work and names
the flag to fix.

Distributed (the mechanics are in distributed.py; README "Memory budget"): one process per GPU; FSDP2
(`fully_shard` per decoder layer, bf16 compute on fp32 master weights, fp32 gradient reduction, activation
checkpointing; HSDP across nodes) on every torchrun rank, CPU/gloo ranks included, which is how the tests run it;
rank 0 reads the weights and broadcasts the shards; a colocated VLLMEngine per rank sleeps while the trainer works
and gets its weights streamed one parameter at a time before every rollout (the HF engine, which cannot generate
from a sharded model, gets an unsharded copy the same way); each rank rolls out whole prompt groups, so advantages
need no communication; the mask-token count of the step is all-reduced once; micro-batches hold at most
--micro-batch-tokens padded tokens and their counts are equalized across ranks; metrics are all-reduced and rank 0
logs; checkpoints are DCP (resumable on another world size), the SFT and final models are bf16 HF exports.

Our choices where the paper is silent, each a flag: toy presets (with a first-turn SFT warm-up that lets the
tiny model learn to copy names, --sft-warmup-steps; 0 for real models); TIS on; KL only when --kl-beta > 0 (then the
SFT model's bf16 export is loaded as the frozen reference, also after --resume); groups whose rewards are all equal
are dropped from the update; held-out evaluation every 50 steps; the process-group timeout (--dist-timeout, 120
minutes) and --keep-checkpoints 2.

Logging: one line per step on rank 0 and a metrics.jsonl record with every reward component, the finish reasons and
the tools' and judge's counters of the step (searches, failures, cache hits, judge calls and fallbacks), summed over
the ranks, and on GPUs the trainer's peak memory in the rollout and the update (mem_rollout_gb, mem_update_gb);
held-out questions (--eval-data, or the toy's test split) are evaluated greedily after SFT, every
--eval-every GRPO steps and at the end, sharded over the ranks, F1/EM per benchmark as {"step", "eval"} records.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import toy_world as tw
from curriculum import SCHEDULES, alpha, blend
from distributed import (CheckpointError, Dist, checkpoints, export_hf, load_checkpoint, load_model,
                         named_full_tensors, peak_memory, prepare_model, reset_peak_memory, save_checkpoint,
                         sft_collectives, verify_checkpoint)
from engine import HFEngine, SamplingParams
from evaluate import exact_match, f1_score
from grpo import group_advantages, grpo_loss, nonzero_groups, token_logprobs
from qa_data import MAX_QUESTION_CHARS, question_chars_arg
from run_setup import fail, setup_real, setup_toy
from search_env import PAPER_LIMITS, rollout, show_mask
from sft import collate, first_turn, micro_batches, training_example, train_sft

# The paper's recipe (PAPER.md §4, DeepResearcher's) for real models, and ours for the CPU toy run. Toy choices
# (LOG.md): a first-turn SFT warm-up, then enough whole-trajectory steps for the tiny model to learn to read values
# out of tool responses (with one search result it happens after ~300-530 steps, depending on the seed; stopping
# SFT right there left reading too unreliable for GRPO); sampling at T = 0.7, because at T = 1 its samples corrupt
# copied names and GRPO learns nothing; lr 3e-4 (5e-4 and 1e-3 collapsed); 20 GRPO steps of 12 questions (30 steps
# of 8 let one run fall apart late, 20 of 8 left one outcome-only run without the second search; 16 questions per
# step were as good but left too little of the 5-minute budget).
# The real run's context is the paper's 32k capped by the model's positions (setup_real); evaluation every 50 steps
# is ours.
PAPER = dict(sft_steps=1000, sft_warmup_steps=0, sft_lr=1e-5, sft_batch=64, grpo_steps=300, lr=1e-6,
             prompts_per_step=256, group_size=16, max_turns=PAPER_LIMITS["max_turns"], topk=10,
             max_new_tokens=PAPER_LIMITS["max_new_tokens"], temperature=1.0, kl_beta=0.001,
             micro_batch_tokens=8192, eval_limit=512, eval_every=50, save_every=50)
TOY = dict(sft_steps=600, sft_warmup_steps=200, sft_lr=1e-3, sft_batch=16, grpo_steps=20, lr=3e-4,
           prompts_per_step=12, group_size=8, **tw.LIMITS, topk=tw.TOPK, temperature=0.7, kl_beta=0.0,
           micro_batch_tokens=8192, eval_limit=600, eval_every=0, save_every=20)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # what to train, on what
    p.add_argument("--model", default=None, help="HF model path or name; omit for the toy world's tiny model")
    p.add_argument("--data", default=None, help="training questions: jsonl path(s) or a hub mix (qa_data.py)")
    p.add_argument("--max-question-chars", type=question_chars_arg, default=MAX_QUESTION_CHARS,
                   help="a longer question or golden answer in --data/--eval-data is a bad row, reported and "
                        f"skipped, never tokenized (default {MAX_QUESTION_CHARS})")
    p.add_argument("--sft-data", default=None, help="SFT jsonl (sft.py make-data); toy: generated in memory")
    p.add_argument("--stage", choices=("sft", "grpo", "all"), default="all", help="which stages to run")
    p.add_argument("--out", default=None, help="output folder (default runs/<time>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many GRPO steps in this invocation (time-limited jobs; then --resume)")
    p.add_argument("--seed", type=int, default=0, help="seed of world, data order and sampling (offset by rank)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept in --out (0: all)")
    # distributed and memory (distributed.py; README "Memory budget")
    p.add_argument("--dist-timeout", type=float, default=120,
                   help="minutes a rank waits in a collective before the run fails (our default)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="ranks sharing one copy of the parameters (default: one node; fewer than all ranks: HSDP)")
    p.add_argument("--vllm-gpu-memory", type=float, default=0.4, help="share of GPU memory vLLM takes when awake")
    p.add_argument("--vllm-max-num-seqs", type=int, default=None, help="sequences vLLM decodes at once")
    p.add_argument("--vllm-sleep", type=int, choices=(0, 2), default=2,
                   help="2: vLLM frees weights and KV cache while the trainer works (GPU only); 0: stays resident")
    # environment
    p.add_argument("--retriever", default=None, help="bm25:CORPUS | http(s)://retrieval-server | serper")
    p.add_argument("--topk", type=int, help="results per search (paper: 10)")
    p.add_argument("--query-cache", default=None, help="sqlite file: identical queries answered from it (7 days)")
    p.add_argument("--reader-url", default=None, help="page reader LLM of browse_webpage (with --retriever serper)")
    p.add_argument("--reader-model", default=None, help="the page reader's model name at --reader-url")
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto", help="rollout engine")
    p.add_argument("--max-turns", type=int, help="turns per episode (paper: 10)")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per turn (paper: 2000)")
    p.add_argument("--max-context", type=int, help="tokens per trajectory (paper: 32k, capped by the model's)")
    p.add_argument("--temperature", type=float, help="sampling temperature (paper: 1.0)")
    # reward
    p.add_argument("--reward", choices=("blend", "outcome"), default="blend",
                   help="blend: α(t)·ATR + (1-α(t))·F1 (paper); outcome: F1 only (α0 = 0)")
    p.add_argument("--alpha0", type=float, default=0.5, help="initial ATR weight α0 (our default, PAPER.md §3)")
    p.add_argument("--schedule", choices=SCHEDULES, default="linear", help="how α decays over the GRPO steps")
    p.add_argument("--rrm-url", default=None, help="OpenAI-compatible judge endpoint (real runs)")
    p.add_argument("--rrm-model", default="Qwen/Qwen3-30B-A3B", help="judge model name at --rrm-url")
    p.add_argument("--rrm-max-tokens", type=int, default=4096, help="judge reply budget, its reasoning included")
    # optimization
    p.add_argument("--sft-steps", type=int, help="SFT optimizer steps on whole trajectories")
    p.add_argument("--sft-warmup-steps", type=int,
                   help="SFT steps on first turns only, before --sft-steps, at twice the batch (toy copy warm-up)")
    p.add_argument("--sft-lr", type=float, help="SFT learning rate")
    p.add_argument("--sft-batch", type=int, help="SFT examples per step per rank")
    p.add_argument("--grpo-steps", type=int, help="GRPO steps (T of the schedule)")
    p.add_argument("--lr", type=float, help="GRPO learning rate (paper: 1e-6, constant)")
    p.add_argument("--prompts-per-step", type=int, help="questions per GRPO step, all ranks (paper: 256)")
    p.add_argument("--group-size", type=int, help="answers per question, G (paper: 16)")
    p.add_argument("--kl-beta", type=float, help="k3 KL weight to the SFT model (paper: 0.001; 0 = no ref model)")
    p.add_argument("--micro-batch-tokens", type=int, help="padded tokens per forward/backward")
    p.add_argument("--no-loss-mask", action="store_true", help="ablation: train on tool-response tokens too")
    p.add_argument("--keep-zero-adv", action="store_true", help="keep groups whose rewards are all equal")
    # evaluation and logging
    p.add_argument("--eval-data", default=None, help="held-out questions: jsonl path(s) or a hub mix (qa_data.py)")
    p.add_argument("--eval-limit", type=int, help="held-out questions per benchmark (paper: 512; toy: test, in all)")
    p.add_argument("--eval-every", type=int, help="evaluate every N GRPO steps (0: after SFT and at the end only)")
    p.add_argument("--save-every", type=int, help="checkpoint every N GRPO steps")
    p.add_argument("--wandb", default=None, help="wandb project name (optional, imported lazily)")
    args = p.parse_args(argv)
    preset = TOY if args.model is None else PAPER
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reward == "outcome":
        args.alpha0 = 0.0
    args.out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    return args


# ----------------------------------------------------------------------------- SFT data of the toy world
def toy_sft_examples(env, args) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Scripted-teacher trajectories on the toy train split, through the real environment (teacher_data.py) ->
    (examples, the teacher-data filter's counts)."""
    from teacher_data import ToyTeacherEngine, make_teacher_data
    questions, tokenizer = env["train"][:tw.SFT_QUESTIONS], env["tokenizer"]
    teacher = ToyTeacherEngine(tokenizer, questions, **tw.TEACHER_FLAWS, seed=args.seed)
    rows, counts = make_teacher_data(teacher, env["tools"], questions, tokenizer=tokenizer,
                                     params=SamplingParams(), system=env["system"], tool_names=env["tool_names"])
    return [training_example(tokenizer, r["messages"]) for r in rows], counts


# ----------------------------------------------------------------------------- one GRPO step
def rewards_of(trajs, rrm, alpha_t: float) -> tuple[list[float], dict, list]:
    """R_i = -1 if malformed, else α(t)·ATR_i + (1 - α(t))·F1_i (PAPER.md §3) -> (rewards, the components' means,
    the ATRs, None where not judged)."""
    f1 = [f1_score(t.answer, t.golden_answers) if t.format_ok else 0.0 for t in trajs]
    atrs = rrm.score(trajs) if alpha_t > 0 and rrm is not None else [None] * len(trajs)
    atr = [a.value if a is not None and a.value is not None else None for a in atrs]
    rewards = [blend(f, a, t.format_ok, alpha_t) for f, a, t in zip(f1, atr, trajs)]
    ok = [t.format_ok for t in trajs]
    judged = [a for a in atr if a is not None]
    ends = {f"finish_{end}": sum(t.finish == end for t in trajs) / len(trajs)   # why the others failed
            for end in ("format_error", "length", "max_turns")}
    return rewards, {"format_ok": sum(ok) / len(trajs), **ends, "f1": sum(f1) / len(trajs),
                     "atr": sum(judged) / len(judged) if judged else float("nan"),
                     "reward": sum(rewards) / len(trajs)}, atrs


def grpo_update(model, optimizer, trajs, advantages: torch.Tensor, args, d: Dist, *, pad_id: int,
                ref_model=None) -> dict:
    """One optimizer step on the rollout batch (on-policy: old_logp = logp.detach(), ratio exactly 1)."""
    rows = []
    for t, a in zip(trajs, advantages.tolist()):
        P = len(t.prompt_ids)
        trained = [1] * len(t.ids) if args.no_loss_mask else t.mask     # the --no-loss-mask ablation
        rows.append((t.prompt_ids + t.ids, [0] * P + trained, [0.0] * P + t.logprobs, a))
    n_tokens = d.sum(sum(sum(r[1]) for r in rows))                        # global mask-1 count, once
    if n_tokens == 0:                               # every group had equal rewards: nothing to learn from
        return {"loss": 0.0, "grad_norm": 0.0, "skipped": 1, "tokens": 0}
    mbs = micro_batches(rows, args.micro_batch_tokens)
    # Equal micro-batch counts on every rank: each FSDP forward/backward (the reference's too) is a collective. A
    # padding micro-batch is one row of two pad tokens with mask 0: the same path, a zero loss.
    padding = [([pad_id, pad_id], [0, 0], [0.0, 0.0], 0.0)]
    mbs += [padding] * (d.max(len(mbs)) - len(mbs))
    scale = d.world if d.fsdp else 1                # FSDP averages gradients over the ranks: undo it
    model.train()
    stats_sum, device = {}, d.device
    for mb in mbs:
        input_ids, attention_mask, mask = (x.to(device) for x in collate([(r[0], r[1]) for r in mb], pad_id))
        sampler = torch.zeros_like(mask)                                 # (B, T) vLLM/HF log-probs, for TIS
        for i, r in enumerate(mb):
            sampler[i, :len(r[2])] = torch.tensor(r[2])
        adv = torch.tensor([r[3] for r in mb], device=device)          # (B,)
        logp = token_logprobs(model, input_ids, attention_mask, temperature=args.temperature)
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(ref_model, input_ids, attention_mask, temperature=args.temperature)
        loss, stats = grpo_loss(logp, logp.detach(), adv, mask, n_tokens=n_tokens, sampler_logp=sampler,
                                ref_logp=ref_logp, kl_beta=args.kl_beta)
        (loss * scale).backward()
        if mb is padding:
            continue
        for k, v in stats.items():     # sums for loss terms, min/max for ratios, token-weighted means otherwise
            if k == "ratio_min" or k == "ratio_max":
                stats_sum[k] = (min if k == "ratio_min" else max)(stats_sum.get(k, v), v)
            else:
                stats_sum[k] = stats_sum.get(k, 0.0) + (v if k in ("loss", "pg_loss", "tokens") else v * stats["tokens"])
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    finite = math.isfinite(grad_norm) and math.isfinite(stats_sum.get("loss", 0.0))   # else skip the step
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    local = max(stats_sum.get("tokens", 0.0), 1.0)
    out = {k: v if k.startswith("ratio") else v / local for k, v in stats_sum.items()
           if k not in ("loss", "pg_loss", "tokens")}
    out.update(loss=stats_sum.get("loss", 0.0), grad_norm=grad_norm, skipped=int(not finite), tokens=n_tokens)
    return out


# ----------------------------------------------------------------------------- evaluation and logging
def evaluate_heldout(engine, env, args, d: Dist, questions: list[dict]) -> dict[str, dict]:
    """Greedy episodes on held-out questions, sharded over the ranks -> {benchmark: {"f1", "em", "n"}} with F1 and
    EM x100 and "all" over every question (a format error scores 0, PAPER.md §5; the toy's benchmarks are its
    question types)."""
    names = sorted({q.get("benchmark", "all") for q in questions})
    sums = {name: [0.0, 0.0, 0] for name in names}                    # F1 sum, EM sum, count
    mine = questions[d.rank::d.world]
    for start in range(0, len(mine), 200):
        batch = mine[start:start + 200]
        trajs = rollout(engine, env["tools"], batch, tokenizer=env["tokenizer"], max_turns=args.max_turns,
                        params=SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens),
                        max_context=args.max_context, system=env["system"], tool_names=env["tool_names"])
        for q, t in zip(batch, trajs):
            answer, total = (t.answer if t.format_ok else None), sums[q.get("benchmark", "all")]
            total[0] += f1_score(answer, t.golden_answers)
            total[1] += exact_match(answer, t.golden_answers)
            total[2] += 1
    flat = d.sums([x for name in names for x in sums[name]])          # every rank's sums, once
    out = {name: flat[3 * i:3 * i + 3] for i, name in enumerate(names)}
    out["all"] = [sum(v[j] for v in out.values()) for j in range(3)]
    return {name: {"f1": 100 * f / max(n, 1), "em": 100 * e / max(n, 1), "n": int(n)}
            for name, (f, e, n) in out.items()}


# Counters of the tools and of the judge, logged per step (summed over ranks): searches, failures, cache use, judge
# calls and fallbacks. Failures that training survives are counted here, never silently.
TOOL_COUNTERS = ("search_calls", "search_failures", "empty_results", "cache_hits", "cache_misses", "browse_calls",
                 "browse_failures", "browse_refused", "reader_failures", "bad_arguments", "unknown_tool")
JUDGE_COUNTERS = ("calls", "retries", "parse_errors", "http_errors", "fallbacks")


def counters(env) -> dict:
    """This rank's TOOL_COUNTERS and JUDGE_COUNTERS (as judge_*) so far."""
    return {**{k: env["tools"].stats[k] for k in TOOL_COUNTERS},
            **{f"judge_{k}": env["rrm"].stats[k] if env["rrm"] else 0 for k in JUDGE_COUNTERS}}


def counter_deltas(env, before: dict, d: Dist) -> dict:
    """The counters' increments since `before` (a `counters` snapshot), summed over the ranks."""
    now = counters(env)
    return dict(zip(now, (int(v) for v in d.sums([now[k] - before[k] for k in now]))))


class Logger:
    """One `|`-separated line per step on rank 0, a jsonl file always, wandb when asked (imported lazily).

    `keep_until`: the step the run resumes after (-1: a fresh start). The records of later steps, logged by a run
    that was stopped or killed and about to be redone, are dropped from metrics.jsonl first, and so are a torn or
    unreadable line (a kill mid-write) and, in a file an older version wrote after a resume, the records a
    restarted step replaces: every step appears once, in order."""

    def __init__(self, out: Path, d: Dist, wandb_project: str | None, config: dict, keep_until: int = -1):
        self.on = d.rank == 0
        path = out / "metrics.jsonl"
        if self.on and path.exists():
            kept: list[tuple[int, str]] = []
            for line in path.read_text(errors="replace").splitlines(keepends=True):
                record = logged_record(line)
                if record is None or record["step"] > keep_until:
                    continue
                if "eval" not in record and kept and kept[-1][0] >= record["step"]:   # the step was redone
                    kept = [(step, kept_line) for step, kept_line in kept if step < record["step"]]
                kept.append((record["step"], line))
            path.with_suffix(".tmp").write_text("".join(line for _, line in kept))
            path.with_suffix(".tmp").replace(path)
        self.file = open(path, "a") if self.on else None
        self.wandb = None
        if self.on and wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, record: dict, line_keys: tuple[str, ...] = ()) -> None:
        if not self.on:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log(record)
        if line_keys:
            print(" | ".join(f"{k} {record[k]:.3f}" if isinstance(record[k], float) else f"{k} {record[k]}"
                             for k in line_keys if k in record), flush=True)

    def log_eval(self, step: int, scores: dict, counts: dict) -> None:
        self.log({"step": step, "eval": scores, **counts})
        if self.on:
            print(f"eval after step {step} | " + " | ".join(f"{name} F1 {s['f1']:.1f} EM {s['em']:.1f} (n {s['n']})"
                                                          for name, s in scores.items()), flush=True)


def logged_record(line: str) -> dict | None:
    """One metrics.jsonl line as a record with an int "step"; None for a torn or unreadable line."""
    try:
        record = json.loads(line) if line.endswith("\n") else None
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


# ----------------------------------------------------------------------------- main
def resume_point(out: Path, d: Dist, damaged: list[tuple[Path, str]]) -> Path | None:
    """The newest intact source for --resume: the checkpoints newest first (step_000000 is the SFT model), then
    the SFT export (sft_model/model), each checked against its manifest; None when there is none (a fresh start).
    `damaged` holds (source, reason) of those found damaged, by this walk or by a failed load, which it skips;
    when every source is damaged the run stops naming each (`error: --resume`). A collective (the hashing)."""
    sources = d.broadcast([*reversed(checkpoints(out / "checkpoints")), out / "sft_model" / "model"])
    for path in sources:
        if not path.exists() or path in {p for p, _ in damaged}:
            continue
        reason = verify_checkpoint(path, d)
        if reason is None:
            return path
        damaged.append((path, reason))
    if damaged:
        fail("--resume", f"nothing intact to resume from in {out}: " + "; ".join(f"{p} is damaged ({r})"
                                                                                 for p, r in damaged))
    return None


def vocab_hash(tokenizer) -> str:
    """A fingerprint of the tokenizer's vocabulary, kept in every checkpoint: token ids mean nothing under another."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def check_same_tokenizer(checkpoint: Path | None, sft_dir: Path, tokenizer) -> None:
    """--resume continues with the tokenizer the saved weights were trained with, or stops (`error: --resume`)."""
    from transformers import AutoTokenizer
    state = checkpoint / "state.json" if checkpoint is not None else None
    saved = json.loads(state.read_text()).get("tokenizer") if state is not None and state.exists() else None
    if saved is None and (sft_dir / "model").exists():
        saved = vocab_hash(AutoTokenizer.from_pretrained(sft_dir / "model"))
    if saved is not None and saved != vocab_hash(tokenizer):
        fail("--resume", f"{checkpoint or sft_dir} was saved with another tokenizer than this run's (a changed toy "
                         "world or --model?): its token ids would be misread")


def generation_copy(model, d: Dist):
    """An unsharded copy of the policy's architecture for HFEngine under FSDP (filled by the first weight sync):
    a sharded model cannot generate, its every forward is a collective and ranks stop at different tokens."""
    from transformers import AutoModelForCausalLM
    with torch.device(d.device):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16 if d.cuda else torch.float32)
    return copy.eval().requires_grad_(False)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        d = Dist(timeout_minutes=args.dist_timeout, shard_size=args.shard_size)
    except ValueError as e:
        fail("--shard-size", str(e))
    args.out = Path(d.broadcast(str(args.out)))    # rank 0's clock names the default folder: one run, one folder
    torch.manual_seed(args.seed + d.rank)
    if d.rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
    d.barrier()
    t_start = time.perf_counter()
    sft_dir, checkpoint_dir = args.out / "sft_model", args.out / "checkpoints"
    export, damaged = sft_dir / "model", []            # damaged: (source, reason) of each one --resume skipped
    resume_from = resume_point(args.out, d, damaged) if args.resume else None   # a checkpoint, or the SFT export
    sft_done = resume_from is not None
    if sft_done and args.kl_beta > 0 and resume_from != export and export.exists():   # the KL reference, unchecked
        reason = verify_checkpoint(export, d)
        if reason is not None:
            fail("--resume", f"{export} is damaged ({reason}); it is the KL reference of --kl-beta")
    do_sft = args.stage in ("sft", "all") and not sft_done
    env = setup_toy(args, d) if args.model is None else setup_real(args, d, needs_sft_data=do_sft)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}   # resolved by the setup
    if d.rank == 0:
        print("config: " + json.dumps(config), flush=True)
        (args.out / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer = env["tokenizer"]
    summary = {"seed": args.seed, "reward": args.reward, "alpha0": args.alpha0}
    if sft_done:
        check_same_tokenizer(resume_from, sft_dir, tokenizer)
        try:
            summary.update(json.loads((sft_dir / "state.json").read_text()))
        except (OSError, ValueError) as e:          # the SFT stage's test F1 only: the run goes on without it
            print(f"warning: {sft_dir / 'state.json'} is unreadable ({type(e).__name__})", file=sys.stderr)

    # The policy, sharded under torchrun: rank 0 reads the weights (the SFT export when resuming from it alone), and
    # a checkpoint overwrites them; the toy's tiny model is built in memory by every rank. Then GRPO's optimizer
    # (SFT makes its own), so that a checkpoint can fill both.
    def policy(source):
        model = load_model(source, d) if source is not None else prepare_model(env.pop("model"), d)
        env["model"] = None                        # no second copy of the weights stays alive
        return model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    model, optimizer = policy(export if resume_from == export else args.model)
    state = {"step": 0}
    while resume_from not in (None, export):
        try:
            state, reason = load_checkpoint(resume_from, model, d, optimizer), None
        except CheckpointError as e:               # intact by its manifest, yet unreadable: the next one
            reason = e.reason
        reason = next((r for r in d.gather(reason) if r is not None), None)   # one rank's failure stops them all
        if reason is None:
            break
        damaged.append((resume_from, reason))
        state, resume_from = {"step": 0}, resume_point(args.out, d, damaged)
        check_same_tokenizer(resume_from, sft_dir, tokenizer)
        model, optimizer = (policy(export) if resume_from == export else   # no half-loaded Adam state stays
                            (model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)))
    if d.rank == 0:
        for path, reason in damaged:
            print(f"warning: {path} is damaged ({reason}); resuming from {resume_from}", file=sys.stderr, flush=True)
    logger = Logger(args.out, d, args.wandb, config, keep_until=state["step"] if sft_done else -1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine, separate = env["engine"], env["engine"] is not None
    if engine is None and d.fsdp:   # a sharded model cannot generate (each new token would be a collective)
        engine, separate = HFEngine(generation_copy(model, d), tokenizer), True
    elif engine is None:
        engine = HFEngine(model, tokenizer)        # shares the trainer's model: nothing to sync
    sync_dtype = torch.bfloat16 if d.cuda else torch.float32

    def synced_engine():   # an engine with its own weights gets the trainer's, streamed, before it generates
        if separate:
            engine.load_weights(named_full_tensors(model, sync_dtype))
        return engine

    def held_out(step: int) -> dict[str, float]:   # greedy F1 per benchmark of the current weights, also logged
        before = counters(env)
        scores = evaluate_heldout(synced_engine(), env, args, d, env["test"])
        engine.sleep()
        logger.log_eval(step, scores, counter_deltas(env, before, d))
        return {name: s["f1"] for name, s in scores.items()}

    # --- stage 1: SFT on atomic-thought teacher trajectories (PAPER.md §1.2)
    if do_sft:
        t0 = time.perf_counter()
        if args.model is None:
            examples, counts = toy_sft_examples(env, args)
            if d.rank == 0:
                print(f"teacher data: {counts}; the first example:\n{tokenizer.decode(examples[0][0])}", flush=True)
        else:
            examples = env["sft_examples"]
        common = dict(pad_id=pad_id, lr=args.sft_lr, seed=args.seed, micro_batch_tokens=args.micro_batch_tokens,
                      **sft_collectives(d))
        if args.sft_warmup_steps:   # first turns only: cheap sequences on which copying the question's name is learnt
            train_sft(model, [first_turn(e) for e in examples], steps=args.sft_warmup_steps,
                      batch_size=2 * args.sft_batch, **common,
                      log=(lambda line: print("warm-up " + line, flush=True)) if d.rank == 0 else None)
        losses = train_sft(model, examples, steps=args.sft_steps, batch_size=args.sft_batch, **common,
                           log=(lambda line: print(line, flush=True)) if d.rank == 0 else None)
        summary.update(sft_seconds=time.perf_counter() - t0, sft_final_loss=losses[-1], **peak_memory(d, "sft"))
        if env["test"]:
            t0 = time.perf_counter()
            summary["test_f1_sft_by_type"] = held_out(0)
            summary.update(eval_seconds=time.perf_counter() - t0, test_f1_sft=summary["test_f1_sft_by_type"]["all"])
        export_hf(sft_dir / "model", model, tokenizer, d)           # bf16: the KL reference, evaluate.py, vLLM
        if d.rank == 0:
            (sft_dir / "state.json").write_text(json.dumps({k: v for k, v in summary.items() if k.startswith("test")}))
        save_checkpoint(checkpoint_dir / "step_000000", model, d, keep=args.keep_checkpoints,   # fp32, to resume
                        state={"step": 0, "tokenizer": vocab_hash(tokenizer)})
    if args.stage == "sft":
        return finish(args, d, summary, t_start, steps=0, engine=env["engine"])

    # --- stage 2: GRPO with the curriculum-blended reward (PAPER.md §3, §4)
    data_rng, start = random.Random(args.seed), state["step"]
    if "data_rng" in state:
        version, internal, gauss = state["data_rng"]                  # random.getstate() through JSON
        data_rng.setstate((version, tuple(internal), gauss))
    ref_model = None
    if args.kl_beta > 0:   # the frozen SFT policy, for the k3 KL term only (also after --resume), like the policy
        ref_source = export if export.exists() else args.model
        ref_model = (load_model(ref_source, d, dtype=sync_dtype, trainable=False) if ref_source is not None else
                     prepare_model(tw.build_tiny_model(tokenizer, seed=args.seed).requires_grad_(False).eval(), d,
                                   trainable=False))    # the toy without SFT: its initial weights, rebuilt
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    per_rank = args.prompts_per_step // d.world
    consecutive_skips, t_eval = 0, 0.0
    bar = None
    if d.rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=args.grpo_steps, initial=start, desc="grpo", disable=None)
    last = args.grpo_steps if args.stop_after is None else min(args.grpo_steps, start + args.stop_after)
    t_grpo = time.perf_counter()
    for step in range(start, last):
        t0 = time.perf_counter()
        before = counters(env)
        reset_peak_memory(d)
        synced_engine()   # before every rollout, step 0 included
        t_sync = time.perf_counter()
        picked = data_rng.sample(env["train"], args.prompts_per_step)       # same draw on every rank
        questions = picked[d.rank * per_rank:(d.rank + 1) * per_rank]       # whole groups stay on one rank
        trajs = rollout(engine, env["tools"], questions, tokenizer=tokenizer, params=params,
                        group_size=args.group_size, max_turns=args.max_turns, max_context=args.max_context,
                        system=env["system"], tool_names=env["tool_names"])
        engine.sleep()                     # vLLM frees its weights and KV cache while the trainer works
        t_rollout, memory = time.perf_counter(), peak_memory(d, "rollout")
        alpha_t = alpha(step, args.grpo_steps, args.schedule, args.alpha0)
        rewards, reward_stats, atrs = rewards_of(trajs, env["rrm"], alpha_t)
        t_judge = time.perf_counter()
        advantages = group_advantages(torch.tensor(rewards), args.group_size)
        keep = torch.ones(len(trajs), dtype=torch.bool) if args.keep_zero_adv else nonzero_groups(advantages,
                                                                                                  args.group_size)
        kept = [t for t, k in zip(trajs, keep.tolist()) if k]
        update = grpo_update(model, optimizer, kept, advantages[keep], args, d, pad_id=pad_id, ref_model=ref_model)
        consecutive_skips = consecutive_skips + 1 if update.get("skipped") and update.get("tokens") else 0
        if consecutive_skips >= 5:
            raise SystemExit(f"stopping: {consecutive_skips} consecutive steps had a non-finite loss or gradient")
        t_update = time.perf_counter()
        memory.update(peak_memory(d, "update"))
        n = d.sum(len(trajs))
        step_counts = counter_deltas(env, before, d)
        record = {"step": step + 1, "alpha": alpha_t, **{k: d.sum(v * len(trajs)) / n for k, v in reward_stats.items()},
                  "tool_calls": d.sum(sum(t.n_tool_calls for t in trajs)) / n,
                  "masked_frac": 1 - d.sum(sum(sum(t.mask) for t in trajs)) / max(1, d.sum(sum(len(t.ids) for t in trajs))),
                  "groups_kept": d.sum(int(keep.sum())) / args.group_size, **step_counts, **memory,
                  **{f"update_{k}": v for k, v in update.items()},
                  "time_sync": t_sync - t0, "time_rollout": t_rollout - t_sync, "time_judge": t_judge - t_rollout,
                  "time_update": t_update - t_judge,
                  "tokens_per_s": update.get("tokens", 0) / max(t_update - t_judge, 1e-9)}
        logger.log(record, ("step", "reward", "format_ok", "f1", "atr", "alpha", "tool_calls", "groups_kept",
                            "update_loss", "update_grad_norm", "time_rollout", "time_update"))
        if d.rank == 0:
            fell_back = [a.error for a in atrs if a is not None and a.fallback]
            if step_counts["judge_fallbacks"] or step_counts["search_failures"]:
                print(f"warning: step {step + 1}: the judge fell back on {step_counts['judge_fallbacks']} trajectories "
                      f"(ATR = its fallback value; on rank 0: {fell_back[-1] if fell_back else 'none'}); "
                      f"{step_counts['search_failures']} of {step_counts['search_calls']} searches failed", flush=True)
            (args.out / "samples").mkdir(exist_ok=True)
            with open(args.out / "samples" / f"step_{step + 1:05d}.txt", "w") as f:
                for t, r in list(zip(trajs, rewards))[:2]:
                    f.write(f"reward {r:.3f} finish {t.finish}\n{show_mask(t, tokenizer, color=False)}\n\n")
            bar.update(1)
        if env["test"] and (step + 1 == args.grpo_steps or args.eval_every and (step + 1) % args.eval_every == 0):
            t0 = time.perf_counter()
            f1 = held_out(step + 1)
            t_eval += time.perf_counter() - t0
            if step + 1 == args.grpo_steps:
                summary.update(test_f1_grpo_by_type=f1, test_f1_grpo=f1["all"])
        if (step + 1) % args.save_every == 0 or step + 1 == last:
            save_checkpoint(checkpoint_dir / f"step_{step + 1:06d}", model, d, optimizer=optimizer,
                            keep=args.keep_checkpoints, state={"step": step + 1, "data_rng": data_rng.getstate(),
                                                               "tokenizer": vocab_hash(tokenizer)})
        if step + 1 == args.grpo_steps:
            export_hf(args.out / "final_model", model, tokenizer, d)   # bf16, for evaluate.py and vLLM
    if bar is not None:
        bar.close()
    summary["grpo_seconds"] = time.perf_counter() - t_grpo - t_eval
    return finish(args, d, summary, t_start, steps=last, engine=env["engine"])


def finish(args, d: Dist, summary: dict, t_start: float, steps: int, engine=None) -> dict:
    summary.update(steps=steps, seconds=time.perf_counter() - t_start)
    if d.rank == 0:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        rows = [(k, summary.get("test_f1_sft_by_type", {}).get(k), summary.get("test_f1_grpo_by_type", {}).get(k))
                for k in summary.get("test_f1_sft_by_type", {})]
        if rows:
            print("\n| held-out benchmark (toy: question type) | F1 after SFT | F1 after GRPO |\n|---|---|---|")
            for k, a, b in rows:
                print(f"| {k} | {a:.1f} | {'-' if b is None else f'{b:.1f}'} |")
        print(f"\nsummary: {json.dumps(summary)}  ({args.out})", flush=True)
    if engine is not None:
        engine.close()          # vLLM's shutdown destroys its process groups, and with them the default one
    if d.on and dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
