"""Train an Atom-Searcher agent: atomic-thought SFT, then loss-masked GRPO on the curriculum-blended reward.

The whole pipeline of the paper (arXiv 2508.12800; METHOD.md §1, §4) in one loop, read top to bottom:
    SFT on teacher trajectories (sft.py)  ->  for step t:  rollout G answers per question (search_env.rollout,
    which makes Trajectory.mask)  ->  R = -1 if malformed, else α(t)·ATR + (1-α(t))·F1   (rrm_reward.py scores the
    atoms; curriculum.trajectory_rewards)  ->  A = (R - mean_G R) / (std_G R + 1e-6)  ->  one loss-masked GRPO step
    (grpo.training_rows turns the mask into the loss mask, grpo.grpo_update)  ->  sync the engine

Run it:
    python train.py                                   # CPU, 3-5 minutes: toy world -> SFT -> GRPO -> test F1
    python train.py --reward outcome                  # the same with F1 only (alpha0 = 0): the paper's ablation
    torchrun --nproc_per_node=8 train.py --model Qwen/Qwen2.5-7B-Instruct --data train.jsonl \\
        --sft-data sft.jsonl --retriever http://host:8000 --rrm-url http://judge:8001 --rrm-model Qwen/Qwen3-30B-A3B \\
        --eval-data nq.jsonl,hotpotqa.jsonl --query-cache cache.sqlite
With no --model the embedded default runs: the toy world (toy_world.py) with its tiny Qwen2, scripted-teacher SFT
data, a rule judge (toy_judge.ToyRRM, --toy-judge) and the toy presets below; with --model the paper's
values (METHOD.md §4) are the defaults. Every flag overrides either. The README's "Real run" goes from questions to
teacher data (`python teacher_data.py`) to this command to `python evaluate.py`; tests/test_real_run.py runs
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
--micro-batch-tokens padded tokens and their counts are equalized across ranks; step metrics are all-reduced and
held-out scores gathered, and rank 0 logs; checkpoints are DCP (resumable on another world size), the SFT and final
models are bf16 HF exports.

Our choices where the paper is silent, most of them a flag (METHOD.md §6 lists them with their reasons): toy presets
(with a first-turn SFT warm-up that lets the tiny model learn to copy names, --sft-warmup-steps; 0 for real models);
TIS on; KL only when --kl-beta > 0 (then the SFT model's bf16 export is loaded as the frozen reference, also after
--resume); groups whose rewards are all equal are dropped from the update; held-out evaluation every 50 steps; the
process-group timeout (--dist-timeout, 120 minutes) and --keep-checkpoints 2. The tinkerer's knobs:
--schedule/--step-frac/--alpha0 (the curriculum), --atr-aggregation (the ATR), --adv-scale (Dr. GRPO),
--clip-eps-high (DAPO's clip-higher), --no-loss-mask, --keep-zero-adv and --answer-normalization, and on the toy
--toy-judge and --toy-types; `python train.py --help` shows them in groups.

Logging (run_log.py): one line per step on rank 0, and a metrics.jsonl record per GRPO step with every reward
component, the reward diagnostics and the counters of the tools and the judge; held-out questions (--eval-data, or
the toy's test split) are evaluated greedily after SFT, every --eval-every GRPO steps and at the end.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import toy_world as tw
import toy_model
from curriculum import NORMALIZATIONS, SCHEDULES, alpha, reward_diagnostics, reward_sums, trajectory_rewards
from distributed import (CheckpointError, Dist, export_hf, generation_copy, load_checkpoint, load_model,
                         named_full_tensors, peak_memory, prepare_model, reset_peak_memory, save_checkpoint,
                         sft_collectives, verify_checkpoint)
from engine import HFEngine, SamplingParams
from evaluate import PAPER_SAMPLE, evaluate_questions
from grpo import grpo_update, group_advantages, nonzero_groups, training_rows
from qa_data import MAX_QUESTION_CHARS, question_chars_arg
from rrm_reward import AGGREGATIONS
from run_log import Logger, counter_deltas, counters, reward_stats, write_summary
from run_setup import check_same_tokenizer, fail, resume_point, setup_real, setup_toy, vocab_hash
from search_env import PAPER_LIMITS, rollout, show_mask
from sft import first_turn, training_example, train_sft
from teacher_data import make_teacher_data

# The presets: the defaults of every flag left unset, PAPER with --model, TOY without. PAPER's values are the
# paper's recipe, which is DeepResearcher's (arXiv 2504.03160, §4; METHOD.md §4), except where marked [ours]; the
# context is the paper's 32k capped by the model's positions (setup_real).
PAPER = dict(sft_steps=1000,             # [ours] the paper gives no SFT details (METHOD.md §6)
             sft_warmup_steps=0,         # [ours] a toy-only warm-up
             sft_lr=1e-5, sft_batch=64,  # [ours]
             grpo_steps=300,             # [ours] the paper's step count is not stated
             lr=1e-6, prompts_per_step=256, group_size=16,                  # DeepResearcher: 1e-6, 256 x 16
             max_turns=PAPER_LIMITS["max_turns"], max_new_tokens=PAPER_LIMITS["max_new_tokens"],   # 10, 2000
             topk=10, temperature=1.0, kl_beta=0.001,                       # DeepResearcher
             micro_batch_tokens=8192,    # [ours] memory, not method
             eval_limit=PAPER_SAMPLE,    # the paper: 512 questions per benchmark (METHOD.md §5)
             eval_every=50, save_every=50)  # [ours]
# Every TOY value is ours (LOG.md): a first-turn SFT warm-up, then enough whole-trajectory steps for the tiny model
# to learn to read values out of tool responses (with one search result it happens after ~300-530 steps, depending
# on the seed; stopping SFT right there left reading too unreliable for GRPO); sampling at T = 0.7, because at T = 1
# its samples corrupt copied names and GRPO learns nothing; lr 3e-4 (5e-4 and 1e-3 collapsed); 20 GRPO steps of 12
# questions (30 steps of 8 let one run fall apart late, 20 of 8 left one outcome-only run without the second search;
# 16 questions per step were as good but left too little of the 5-minute budget).
TOY = dict(sft_steps=600, sft_warmup_steps=200, sft_lr=1e-3, sft_batch=16, grpo_steps=20, lr=3e-4,
           prompts_per_step=12, group_size=8, **tw.LIMITS, topk=tw.TOPK, temperature=0.7, kl_beta=0.0,
           micro_batch_tokens=8192, eval_limit=600, eval_every=0, save_every=20)


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags, in groups; a flag left unset gets its preset's value (parse_args)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("what to train, on what")
    g.add_argument("--model", default=None, help="HF model path or name; omit for the toy world's tiny model")
    g.add_argument("--data", default=None, help="training questions: jsonl path(s) or a hub mix (qa_data.py)")
    g.add_argument("--max-question-chars", type=question_chars_arg, default=MAX_QUESTION_CHARS,
                   help="a longer question or golden answer in --data/--eval-data is a bad row, reported and "
                        f"skipped, never tokenized (default {MAX_QUESTION_CHARS})")
    g.add_argument("--sft-data", default=None, help="SFT jsonl (teacher_data.py); toy: generated in memory")
    g.add_argument("--stage", choices=("sft", "grpo", "all"), default="all", help="which stages to run")
    g.add_argument("--out", default=None, help="output folder (default runs/<time>)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many GRPO steps in this invocation (time-limited jobs; then --resume)")
    g.add_argument("--seed", type=int, default=0, help="seed of world, data order and sampling (offset by rank)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept in --out (0: all)")
    g = p.add_argument_group("distributed and memory", "distributed.py; README \"Memory budget\"")
    g.add_argument("--dist-timeout", type=float, default=120,
                   help="minutes a rank waits in a collective before the run fails (our default)")
    g.add_argument("--shard-size", type=int, default=None,
                   help="ranks sharing one copy of the parameters (default: one node; fewer than all ranks: HSDP)")
    g.add_argument("--vllm-gpu-memory", type=float, default=0.4, help="share of GPU memory vLLM takes when awake")
    g.add_argument("--vllm-max-num-seqs", type=int, default=None, help="sequences vLLM decodes at once")
    g.add_argument("--vllm-sleep", type=int, choices=(0, 2), default=2,
                   help="2: vLLM frees weights and KV cache while the trainer works (GPU only); 0: stays resident")
    g = p.add_argument_group("environment")
    g.add_argument("--retriever", default=None, help="bm25:CORPUS | http(s)://retrieval-server | serper")
    g.add_argument("--topk", type=int, help="results per search (paper: 10)")
    g.add_argument("--query-cache", default=None, help="sqlite file: identical queries answered from it (7 days)")
    g.add_argument("--reader-url", default=None, help="page reader LLM of browse_webpage (with --retriever serper)")
    g.add_argument("--reader-model", default=None, help="the page reader's model name at --reader-url")
    g.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto", help="rollout engine")
    g.add_argument("--toy-types", default=None,
                   help="toy: GRPO on these question types only, e.g. mentor_city (SFT and evaluation keep all)")
    g.add_argument("--max-turns", type=int, help="turns per episode (paper: 10)")
    g.add_argument("--max-new-tokens", type=int, help="new tokens per turn (paper: 2000)")
    g.add_argument("--max-context", type=int, help="tokens per trajectory (paper: 32k, capped by the model's)")
    g.add_argument("--temperature", type=float, help="sampling temperature (paper: 1.0)")
    g = p.add_argument_group("reward")
    g.add_argument("--reward", choices=("blend", "outcome"), default="blend",
                   help="blend: α(t)·ATR + (1-α(t))·F1 (paper); outcome: F1 only (α0 = 0)")
    g.add_argument("--alpha0", type=float, default=0.5, help="initial ATR weight α0 (our default, METHOD.md §3)")
    g.add_argument("--schedule", choices=SCHEDULES, default="linear", help="how α decays over the GRPO steps")
    g.add_argument("--step-frac", type=float, default=0.5,
                   help="--schedule step: α = α0 before step-frac·T, 0 after (our default)")
    g.add_argument("--atr-aggregation", choices=AGGREGATIONS, default="mean",
                   help="ATR from the atoms' 0-10 scores: their mean, min, or the last turn's mean, /10 (ours: mean)")
    g.add_argument("--answer-normalization", choices=NORMALIZATIONS, default="deepresearcher",
                   help="F1/EM normalization: DeepResearcher's (the paper's tables) or unicode (METHOD.md §3.2)")
    g.add_argument("--rrm-url", default=None, help="OpenAI-compatible judge endpoint (real runs)")
    g.add_argument("--toy-judge", choices=("oracle", "blind"), default="oracle",
                   help="the toy's judge (toy_judge.py): oracle knows the gold chain; blind sees what an LLM judge "
                        "would (question, atoms, retrieved text); bench/ablation.py uses blind")
    g.add_argument("--rrm-model", default="Qwen/Qwen3-30B-A3B", help="judge model name at --rrm-url")
    g.add_argument("--rrm-max-tokens", type=int, default=4096, help="judge reply budget, its reasoning included")
    g = p.add_argument_group("optimization")
    g.add_argument("--sft-steps", type=int, help="SFT optimizer steps on whole trajectories")
    g.add_argument("--sft-warmup-steps", type=int,
                   help="SFT steps on first turns only, before --sft-steps, at twice the batch (toy copy warm-up)")
    g.add_argument("--sft-lr", type=float, help="SFT learning rate")
    g.add_argument("--sft-batch", type=int, help="SFT examples per step per rank")
    g.add_argument("--grpo-steps", type=int, help="GRPO steps (T of the schedule)")
    g.add_argument("--lr", type=float, help="GRPO learning rate (paper: 1e-6, constant)")
    g.add_argument("--prompts-per-step", type=int, help="questions per GRPO step, all ranks (paper: 256)")
    g.add_argument("--group-size", type=int, help="answers per question, G (paper: 16)")
    g.add_argument("--kl-beta", type=float, help="k3 KL weight to the SFT model (paper: 0.001; 0 = no ref model)")
    g.add_argument("--micro-batch-tokens", type=int, help="padded tokens per forward/backward")
    g.add_argument("--adv-scale", choices=("std", "none"), default="std",
                   help="std: A = (R - mean) / (std + 1e-6), GRPO's; none: A = R - mean, Dr. GRPO's")
    g.add_argument("--clip-eps-high", type=float, default=0.2,
                   help="upper ratio clip ε_high (GRPO: 0.2 = ε_low; DAPO's clip-higher: 0.28). No effect while each "
                        "rollout batch gets one optimizer step (the ratio is exactly 1; METHOD.md §8.1)")
    g.add_argument("--no-loss-mask", action="store_true", help="ablation: train on tool-response tokens too")
    g.add_argument("--keep-zero-adv", action="store_true", help="keep groups whose rewards are all equal")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-data", default=None, help="held-out questions: jsonl path(s) or a hub mix (qa_data.py)")
    g.add_argument("--eval-limit", type=int, help="held-out questions per benchmark (paper: 512; toy: test, in all)")
    g.add_argument("--eval-every", type=int, help="evaluate every N GRPO steps (0: after SFT and at the end only)")
    g.add_argument("--save-every", type=int, help="checkpoint every N GRPO steps")
    g.add_argument("--wandb", default=None, help="wandb project name (optional, imported lazily)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    preset = TOY if args.model is None else PAPER
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0.0 <= args.step_frac <= 1.0:
        fail("--step-frac", f"must be in [0, 1] (a fraction of --grpo-steps), got {args.step_frac}")
    if args.toy_types and (args.model is not None or not set(args.toy_types.split(",")) <= set(tw.QUESTION_TYPES)):
        fail("--toy-types", f"the toy world's question types, comma-separated, from {tw.QUESTION_TYPES} (not with "
                            f"--model); got {args.toy_types!r}")
    if args.clip_eps_high < 0:
        fail("--clip-eps-high", f"must be >= 0, got {args.clip_eps_high}")
    if args.reward == "outcome":
        args.alpha0 = 0.0
    args.out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    return args


# ----------------------------------------------------------------------------- SFT data of the toy world
def toy_sft_examples(env, args) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Scripted-teacher trajectories on the toy train split, through the real environment (teacher_data.py) ->
    (examples, the teacher-data filter's counts)."""
    questions, tokenizer = env["train"][:tw.SFT_QUESTIONS], env["tokenizer"]
    teacher = tw.ToyTeacherEngine(tokenizer, questions, **tw.TEACHER_FLAWS, seed=args.seed)
    rows, counts = make_teacher_data(teacher, env["tools"], questions, tokenizer=tokenizer,
                                     params=SamplingParams(), system=env["system"], tool_names=env["tool_names"])
    return [training_example(tokenizer, r["messages"]) for r in rows], counts


# ----------------------------------------------------------------------------- held-out evaluation
def held_out_scores(engine, env, args, d: Dist) -> dict[str, dict]:
    """Greedy episodes on the held-out questions (evaluate.evaluate_questions, sharded over the ranks) ->
    {benchmark: {"f1", "em", "n"}} with F1 and EM x100 and "all" over every question (the toy's benchmarks are
    its question types)."""
    mine = env["test"][d.rank::d.world]
    records = evaluate_questions(engine, env["tools"], mine, tokenizer=env["tokenizer"],
                                 params=SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens),
                                 max_turns=args.max_turns, max_context=args.max_context, system=env["system"],
                                 tool_names=env["tool_names"], batch_size=200,
                                 normalization=args.answer_normalization)
    scored = [s for part in d.gather([(q.get("benchmark", "all"), r["f1"], r["em"]) for q, r in zip(mine, records)])
              for s in part]                                          # every rank's (benchmark, F1, EM)
    groups = {name: [s for s in scored if s[0] == name] for name in sorted({s[0] for s in scored})}
    groups["all"] = scored
    return {name: {"f1": 100 * sum(s[1] for s in g) / max(len(g), 1), "em": 100 * sum(s[2] for s in g) / max(len(g), 1),
                   "n": len(g)} for name, g in groups.items()}


# ----------------------------------------------------------------------------- main
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
        scores = held_out_scores(synced_engine(), env, args, d)
        engine.sleep()
        logger.log_eval(step, scores, counter_deltas(env, before, d))
        return {name: s["f1"] for name, s in scores.items()}

    # --- stage 1: SFT on atomic-thought teacher trajectories (METHOD.md §1.2)
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

    # --- stage 2: GRPO with the curriculum-blended reward (METHOD.md §3, §4)
    data_rng, start = random.Random(args.seed), state["step"]
    if "data_rng" in state:
        version, internal, gauss = state["data_rng"]                  # random.getstate() through JSON
        data_rng.setstate((version, tuple(internal), gauss))
    ref_model = None
    if args.kl_beta > 0:   # the frozen SFT policy, for the k3 KL term only (also after --resume), like the policy
        ref_source = export if export.exists() else args.model
        ref_model = (load_model(ref_source, d, dtype=sync_dtype, trainable=False) if ref_source is not None else
                     prepare_model(toy_model.build_tiny_model(tokenizer, seed=args.seed).requires_grad_(False).eval(),
                                   d, trainable=False))    # the toy without SFT: its initial weights, rebuilt
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    types = args.toy_types and args.toy_types.split(",")
    pool = [q for q in env["train"] if q["metadata"]["type"] in types] if types else env["train"]
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
        picked = data_rng.sample(pool, args.prompts_per_step)               # same draw on every rank
        questions = picked[d.rank * per_rank:(d.rank + 1) * per_rank]       # whole groups stay on one rank
        trajs = rollout(engine, env["tools"], questions, tokenizer=tokenizer, params=params,
                        group_size=args.group_size, max_turns=args.max_turns, max_context=args.max_context,
                        system=env["system"], tool_names=env["tool_names"])
        engine.sleep()                     # vLLM frees its weights and KV cache while the trainer works
        t_rollout, memory = time.perf_counter(), peak_memory(d, "rollout")
        alpha_t = alpha(step, args.grpo_steps, args.schedule, args.alpha0, args.step_frac)
        rewards, f1, atrs = trajectory_rewards(trajs, env["rrm"], alpha_t, args.answer_normalization)
        t_judge = time.perf_counter()
        advantages = group_advantages(torch.tensor(rewards), args.group_size, scale=args.adv_scale)
        keep = torch.ones(len(trajs), dtype=torch.bool) if args.keep_zero_adv else nonzero_groups(advantages,
                                                                                                  args.group_size)
        rows = training_rows([t for t, k in zip(trajs, keep.tolist()) if k], advantages[keep].tolist(),
                             use_loss_mask=not args.no_loss_mask)
        update = grpo_update(model, optimizer, rows, n_tokens=d.sum(sum(sum(r.mask) for r in rows)), pad_id=pad_id,
                             micro_batch_tokens=args.micro_batch_tokens, temperature=args.temperature,
                             kl_beta=args.kl_beta, ref_model=ref_model, clip_eps_high=args.clip_eps_high,
                             loss_scale=d.world if d.fsdp else 1, max_count=d.max)   # FSDP averages: undo it
        consecutive_skips = consecutive_skips + 1 if update.get("skipped") and update.get("tokens") else 0
        if consecutive_skips >= 5:
            raise SystemExit(f"stopping: {consecutive_skips} consecutive steps had a non-finite loss or gradient")
        t_update = time.perf_counter()
        memory.update(peak_memory(d, "update"))
        n = d.sum(len(trajs))
        step_counts = counter_deltas(env, before, d)
        diagnostics = reward_diagnostics(d.sums(reward_sums(rewards, f1, atrs, [t.format_ok for t in trajs], alpha_t,
                                                            args.group_size)))   # every rank's groups
        record = {"step": step + 1, "alpha": alpha_t,
                  **{k: d.sum(v * len(trajs)) / n for k, v in reward_stats(trajs, rewards, f1, atrs).items()},
                  **diagnostics,
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
        write_summary(args.out, summary)
    if engine is not None:
        engine.close()          # vLLM's shutdown destroys its process groups, and with them the default one
    if d.on and dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
