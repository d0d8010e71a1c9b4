"""Supervised fine-tuning on atomic-thought trajectories, and the teacher that writes them.

Atom-Searcher's first stage (arXiv 2508.12800, §3.2; PAPER.md §1.2): a teacher LLM writes full multi-turn
search trajectories whose `<think>` blocks are split into atomic thoughts, and the policy is fine-tuned on
them, so that RL starts from a model that already thinks in atoms and calls tools in the right format.

Three pieces:
1. `render_conversation`: chat messages -> (prompt_ids, ids, mask) with *exactly* the rollout's token format
   and mask convention (search_env.py): the forced `<think>` prefix and all template glue and tool responses
   are mask 0, the assistant's own text is mask 1. SFT and RL therefore train on identical token layouts
   (DESIGN.md "The one data structure"); a test checks the ids and masks equal a rollout's.
2. `sft_loss`: token-mean cross-entropy over mask-1 tokens, -Σ m·log p / N_tok. It is GRPO's loss with
   every advantage 1 and no ratio (training_design.md §2.5), computed by the same chunked `token_logprobs`.
3. `make_teacher_data`: runs the real environment (search_env.rollout) with a teacher in the engine's
   place, keeps trajectories that are well-formed, have at least one atom in every think block and F1 >=
   `min_f1`, and writes them as jsonl of chat messages. Teachers: `ToyTeacherEngine` (the toy world's
   scripted teacher, deliberately imperfect: toy_world.teacher_turns) or `ChatTeacherEngine` (an
   OpenAI-compatible chat endpoint prompted to write atomic thoughts; our prompt).

Our choices (the paper gives no SFT details; PAPER.md §6): the teacher prompt, the filter (format + atoms +
F1 threshold, default 0.0 for the toy teacher so its flaws survive), and the loss (token-mean).

Run:
    python sft.py make-data --world-seed 0 --out data/sft.jsonl            # toy teacher on the toy world
    python sft.py --data data/sft.jsonl --model DIR --out DIR2 [--steps N]     (also under torchrun: DDP)
The 8-GPU FSDP2 run of this stage is `torchrun --nproc_per_node=8 train.py --stage sft ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import requests
import torch

from atomic_thought import THINK_PREFIX, render_messages, render_turn
from engine import Completion
from evaluate import f1_score
from grpo import token_logprobs
from search_env import TurnGlue, prompt_ids, rollout


# ----------------------------------------------------------------------------- rendering
def render_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, ids, mask) of a conversation [system, user, assistant, tool, assistant, ...].

    Built from the same pieces as the rollout (prompt_ids, TurnGlue), so the ids equal what a rollout that
    sampled these assistant texts would hold, and mask = 1 exactly on the assistant's text after `<think>\\n`.
    """
    roles = [m["role"] for m in messages]
    if roles[:2] != ["system", "user"] or len(roles) < 3 or roles[-1] != "assistant":
        raise ValueError(f"expected [system, user, assistant, (tool, assistant)*], got roles {roles}")
    glue = TurnGlue(tokenizer)
    p_ids = prompt_ids(tokenizer, messages[1]["content"], messages[0]["content"])
    ids, mask = [], []
    for k, m in enumerate(messages[2:], start=2):
        expected = "assistant" if k % 2 == 0 else "tool"
        if m["role"] != expected:
            raise ValueError(f"message {k} has role {m['role']!r}, expected {expected!r}")
        if m["role"] == "assistant":
            if not m["content"].startswith(THINK_PREFIX):
                raise ValueError(f"assistant message {k} must start with {THINK_PREFIX!r} (the forced prefix)")
            sampled = tokenizer(m["content"][len(THINK_PREFIX):], add_special_tokens=False)["input_ids"]
            injected = glue.close_ids(False) if k == len(messages) - 1 else []
        else:
            sampled, injected = [], glue.tool_ids(m["content"])
        ids += sampled + injected
        mask += [1] * len(sampled) + [0] * len(injected)
    return p_ids, ids, mask


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (token ids, mask) rows -> input_ids, attention_mask, loss mask, each (B, T).

    Right padding lets a causal model ignore the pads (real tokens never attend to later positions), and
    the pads carry mask 0, so they touch neither loss nor token count.
    """
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)       # (B, T)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros(len(rows), width)
    for i, (ids, m) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        loss_mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    return input_ids, attention_mask, loss_mask


def sft_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
             n_tokens: float | None = None) -> torch.Tensor:
    """L = -Σ_{b,t} m_{b,t} log p(y_{b,t} | y_<t) / N_tok: token-mean cross-entropy over mask-1 tokens.

    `n_tokens` is the mask-1 count of the whole optimizer step (all micro-batches and ranks), so the
    gradient does not depend on how the step is split; default: this micro-batch's own count.
    """
    logp = token_logprobs(model, input_ids, attention_mask)                    # (B, T) fp32
    n = loss_mask.sum() if n_tokens is None else n_tokens
    return -(logp * loss_mask).sum() / max(float(n), 1.0)


# ----------------------------------------------------------------------------- teachers
class ToyTeacherEngine:
    """The toy world's scripted teacher behind the engine interface: plays `teacher_turns` as token ids.

    It recognises the conversation by its question text and counts the tool responses so far to know which
    turn to play. Its flaws are drawn once per trajectory (deterministically from `seed`).
    """

    def __init__(self, tokenizer, questions: list[dict], *, premature_rate: float, wrong_search_rate: float,
                 seed: int = 0):
        from toy_world import teacher_turns
        rng = random.Random(seed)
        self.tokenizer = tokenizer
        self.turns = {q["question"]: teacher_turns(q, rng, premature_rate, wrong_search_rate) for q in questions}

    sampler_logprob = 0.0   # the log-prob reported for every played token (a script has no distribution)

    def conversation_state(self, prompt_ids: list[int]) -> tuple[str, int]:
        """(question, number of tool responses so far) of a ChatML conversation."""
        text = self.tokenizer.decode(prompt_ids)
        question = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        return question, text.split("<|im_start|>assistant", 1)[1].count("<tool_response>")

    def turn_text(self, question: str, k: int) -> str:
        """The assistant text of turn k, after the forced `<think>` prefix."""
        return render_turn(self.turns[question][k])[len(THINK_PREFIX):]

    def generate(self, prompt_ids_list, params) -> list[Completion]:
        out = []
        for ids in prompt_ids_list:
            turn_ids = self.tokenizer(self.turn_text(*self.conversation_state(ids)),
                                      add_special_tokens=False)["input_ids"][:params.max_new_tokens]
            out.append(Completion(turn_ids, [self.sampler_logprob] * len(turn_ids), "stop",
                                  self.tokenizer.decode(turn_ids)))
        return out


TEACHER_INSTRUCTIONS = (
    "Write your reasoning inside <think> as a few short atomic thoughts, each in its own tag, in this order: "
    "<OBSERVATION> what the question or the last results say </OBSERVATION>, <HYPOTHESIS_TESTING> a candidate "
    "answer or plan and the evidence it needs </HYPOTHESIS_TESTING>, <RISK_ANALYSIS> what could be wrong "
    "</RISK_ANALYSIS>, <ACTION> what to do next </ACTION>. Then make exactly one tool call or give the answer.")


class ChatTeacherEngine:
    """A teacher LLM behind an OpenAI-compatible chat endpoint, plugged into the rollout as an engine.

    The rollout hands it token ids; it splits the decoded ChatML text (`<|im_start|>role\\n...<|im_end|>`,
    the format of Qwen2.5 and of the toy tokenizer) back into messages, adds `TEACHER_INSTRUCTIONS` to the
    system message, and tokenizes the teacher's reply with the policy's tokenizer. The API key comes from
    the environment variable named by `api_key_env` and is never logged. A failed call returns an empty
    completion, which the rollout records as a format error and the filter drops.
    """

    def __init__(self, base_url: str, model: str, tokenizer, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, temperature: float = 0.7):
        self.url = base_url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
        self.model, self.tokenizer, self.timeout, self.temperature = model, tokenizer, timeout, temperature
        self.session = requests.Session()
        key = os.environ.get(api_key_env)
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.failures = 0

    def _messages(self, ids: list[int]) -> list[dict]:
        text = self.tokenizer.decode(ids)
        messages = []
        for block in text.split("<|im_start|>")[1:]:
            role, _, content = block.partition("\n")
            messages.append({"role": role, "content": content.split("<|im_end|>")[0]})
        if messages and messages[-1]["role"] == "assistant":     # the open turn: its forced prefix only
            messages.pop()
        messages[0]["content"] += "\n" + TEACHER_INSTRUCTIONS
        return messages

    def generate(self, prompt_ids_list, params) -> list[Completion]:
        out = []
        for ids in prompt_ids_list:
            payload = {"model": self.model, "messages": self._messages(ids), "temperature": self.temperature,
                       "max_tokens": params.max_new_tokens, "stop": list(params.stop)}
            try:
                reply = self.session.post(self.url, json=payload, timeout=self.timeout)
                reply.raise_for_status()
                choice = reply.json()["choices"][0]
                text = choice["message"]["content"] or ""
                # Servers drop the stop string from the text: put back the one this turn ended with.
                if "<tool_call>" in text and "</tool_call>" not in text:
                    text += "</tool_call>"
                elif "<answer>" in text and "</answer>" not in text:
                    text += "</answer>"
            except (requests.RequestException, KeyError, IndexError, TypeError, ValueError):
                self.failures += 1
                text = ""
            text = text.removeprefix(THINK_PREFIX).removeprefix("<think>")
            turn_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(Completion(turn_ids, [0.0] * len(turn_ids), "stop", text))
        return out


def make_teacher_data(teacher, tools, questions: list[dict], *, tokenizer, params, system: str,
                      tool_names: tuple[str, ...], min_f1: float = 0.0, max_turns: int = 10,
                      batch_size: int = 64) -> tuple[list[dict], dict]:
    """Run the teacher in the real environment and keep the good trajectories -> (rows, counts).

    A row: {"question", "golden_answers", "messages", "f1", "metadata"}. Kept when well-formed, every think
    block holds at least one atomic thought, and F1 >= min_f1.
    """
    rows, counts = [], {"generated": 0, "format_error": 0, "no_atoms": 0, "low_f1": 0, "kept": 0}
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        for t in rollout(teacher, tools, batch, tokenizer=tokenizer, params=params, max_turns=max_turns,
                         system=system, tool_names=tool_names):
            counts["generated"] += 1
            if not t.format_ok:
                counts["format_error"] += 1
            elif not all(turn.atoms for turn in t.turns):
                counts["no_atoms"] += 1
            elif (f1 := f1_score(t.answer, t.golden_answers)) < min_f1:
                counts["low_f1"] += 1
            else:
                counts["kept"] += 1
                rows.append({"question": t.question, "golden_answers": t.golden_answers, "f1": f1,
                             "messages": render_messages(system, t.question, t.turns, t.tool_responses), "metadata": t.metadata})
    return rows, counts


# ----------------------------------------------------------------------------- training
def training_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Chat messages -> one SFT example: (prompt_ids + ids, mask with 0 over the prompt)."""
    prompt_ids, ids, mask = render_conversation(tokenizer, messages)
    return prompt_ids + ids, [0] * len(prompt_ids) + mask


def first_turn(example: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """An example cut after its first trained span: the prompt and the first assistant turn only.

    Our toy-demo warm-up (train.py --sft-warmup-steps): on these ~3x shorter sequences the tiny model learns
    to copy the question's name into its thoughts and query within ~200 steps, which on whole trajectories it
    had not done after 300 (LOG.md); a pretrained LLM arrives with that in-context copying already.
    """
    ids, mask = example
    if 1 not in mask:
        raise ValueError("example has no trained (mask-1) token")
    end = mask.index(1)
    while end < len(mask) and mask[end] == 1:
        end += 1
    return ids[:end], mask[:end]


def sft_step(model, rows: list[tuple[list[int], list[int]]], *, pad_id: int, micro_batch: int,
             n_tokens: float, loss_scale: float = 1.0) -> float:
    """Forward + backward of one optimizer step's rows in micro-batches; returns the step's loss.

    Gradients accumulate; each micro-batch's loss is divided by the step's global token count `n_tokens`
    (times `loss_scale`, which a caller under gradient averaging sets to the world size), so the sum over
    micro-batches and ranks is the token-mean of the whole step.
    """
    device = next(model.parameters()).device
    total = 0.0
    rows = sorted(rows, key=lambda r: len(r[0]))   # similar lengths share a micro-batch: less padding, same sum
    for start in range(0, len(rows), micro_batch):
        input_ids, attention_mask, loss_mask = (x.to(device) for x in collate(rows[start:start + micro_batch], pad_id))
        loss = sft_loss(model, input_ids, attention_mask, loss_mask, n_tokens=n_tokens)
        (loss * loss_scale).backward()
        total += loss.item()
    return total


def train_sft(model, examples: list[tuple[list[int], list[int]]], *, pad_id: int, steps: int, batch_size: int,
              lr: float, micro_batch: int = 8, grad_clip: float = 1.0, seed: int = 0, log=print,
              rank: int = 0, world_size: int = 1, all_reduce=None) -> list[float]:
    """Plain SFT loop: AdamW, constant lr, `steps` steps of `batch_size` examples per rank -> per-step losses.

    Each example is prompt_ids + ids with mask (0 on the prompt). Under several ranks `all_reduce(tensor)`
    sums a tensor across ranks (the token count), and the model is expected to average gradients (DDP).
    """
    generator = random.Random(seed + rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        t0 = time.perf_counter()
        rows = [examples[generator.randrange(len(examples))] for _ in range(batch_size)]
        n_tokens = torch.tensor(float(sum(sum(m) for _, m in rows)))
        if all_reduce is not None:
            all_reduce(n_tokens)                      # global mask-1 count of the step, once, before backward
        loss = sft_step(model, rows, pad_id=pad_id, micro_batch=micro_batch, n_tokens=n_tokens.item(),
                        loss_scale=world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if torch.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"sft step {step:4d} | loss {loss:.4f} | grad_norm {float(grad_norm):.3f} | "
                f"tokens {int(n_tokens.item())} | {time.perf_counter() - t0:.2f}s")
    return losses


def load_examples(path: str, tokenizer) -> list[tuple[list[int], list[int]]]:
    """SFT jsonl (rows with "messages") -> (prompt_ids + ids, mask) examples; bad rows name file and line."""
    examples = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(training_example(tokenizer, json.loads(line)["messages"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: not an SFT row with valid chat messages: {e}") from None
    if not examples:
        raise ValueError(f"{path}: no SFT rows")
    return examples


def main(argv: list[str] | None = None) -> None:
    import toy_world as tw       # make-data's defaults are the demo's teacher flaws
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-data", help="toy teacher trajectories in the toy world -> SFT jsonl")
    make.add_argument("--world-seed", type=int, default=0, help="toy world seed")
    make.add_argument("--n", type=int, default=tw.SFT_QUESTIONS, help="number of train questions to run the teacher on")
    make.add_argument("--premature-rate", type=float, default=tw.TEACHER_FLAWS["premature_rate"],
                      help="teacher flaw: answer one hop early")
    make.add_argument("--wrong-search-rate", type=float, default=tw.TEACHER_FLAWS["wrong_search_rate"],
                      help="teacher flaw: misspelt first search")
    make.add_argument("--min-f1", type=float, default=0.0, help="keep trajectories with F1 >= this")
    make.add_argument("--out", required=True, help="output jsonl")
    train = commands.add_parser("train", help="fine-tune a model on SFT jsonl and save an HF checkpoint")
    train.add_argument("--data", required=True, help="SFT jsonl (rows with chat 'messages')")
    train.add_argument("--model", required=True, help="HF model directory or name")
    train.add_argument("--out", required=True, help="output directory for the fine-tuned checkpoint")
    train.add_argument("--steps", type=int, default=300, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=16, help="examples per step per rank")
    train.add_argument("--micro-batch", type=int, default=8, help="examples per forward/backward")
    train.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (constant)")
    train.add_argument("--seed", type=int, default=0, help="sampling seed (offset by rank)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("make-data", "train", "-h", "--help"):
        argv.insert(0, "train")       # `python sft.py --data ... --model ... --out ...` trains
    args = parser.parse_args(argv)

    if args.command == "make-data":
        from engine import SamplingParams
        from retrievers import BM25Retriever
        from search_env import Tools
        world = tw.build_world(args.world_seed)
        tokenizer = tw.build_tokenizer(world)
        corpus = os.path.join(os.path.dirname(os.path.abspath(args.out)) or ".", f"toy-corpus-{world.key()}.jsonl")
        tw.write_jsonl(world.corpus, corpus)
        questions = world.splits["train"][:args.n]
        teacher = ToyTeacherEngine(tokenizer, questions, premature_rate=args.premature_rate,
                                   wrong_search_rate=args.wrong_search_rate, seed=args.world_seed)
        rows, counts = make_teacher_data(teacher, Tools(BM25Retriever(corpus), topk=tw.TOPK, tokenizer=tokenizer),
                                         questions, tokenizer=tokenizer, params=SamplingParams(),
                                         system=tw.SYSTEM, tool_names=tw.TOOLS, min_f1=args.min_f1)
        tw.write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} trajectories to {args.out}: {counts}")
        return

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ddp = "RANK" in os.environ                        # the same script under python and torchrun
    rank, world_size = 0, 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    examples = load_examples(args.data, tokenizer)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    train_sft(wrapped, examples, pad_id=tokenizer.pad_token_id or 0, steps=args.steps, batch_size=args.batch_size,
              lr=args.lr, micro_batch=args.micro_batch, seed=args.seed, rank=rank, world_size=world_size,
              all_reduce=dist.all_reduce if ddp else None, log=print if rank == 0 else None)
    if rank == 0:
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        print(f"saved {args.out}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
