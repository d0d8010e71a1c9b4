"""Run by tests/test_engine.py in a subprocess (vLLM sets process-wide thread state): HF vs vLLM parity.

Prints one JSON line: greedy rollouts of both engines before and after an in-place weight update.
"""
import json
import sys

import torch

import toy_model
import toy_world as tw
from qa_data import write_jsonl
from engine import HFEngine, SamplingParams, VLLMEngine
from retrievers import BM25Retriever
from tools import Tools
from search_env import rollout


def main(workdir: str) -> None:
    world = tw.build_world(0, tw.WorldConfig(n_train=40, n_dev=10, n_test=20, n_extra_people=20))
    tokenizer = tw.build_tokenizer(world, cache_dir=workdir)
    model = toy_model.build_tiny_model(tokenizer)
    with torch.no_grad():   # sharpen the random model so greedy choices are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    model.save_pretrained(f"{workdir}/model")
    tokenizer.save_pretrained(f"{workdir}/model")
    # The engine is built before the retriever imports bm25s (see retrievers._bm25s).
    vllm = VLLMEngine(f"{workdir}/model", dtype="float32", max_model_len=2048, enforce_eager=True,
                      gpu_memory_utilization=0.3)
    write_jsonl(world.corpus, f"{workdir}/corpus.jsonl")
    tools = Tools(BM25Retriever(f"{workdir}/corpus.jsonl"), topk=3, tokenizer=tokenizer)
    questions = world.splits["test"][:6]
    params = SamplingParams(temperature=0, max_new_tokens=24)

    def run(engine):
        trajs = rollout(engine, tools, questions, tokenizer=tokenizer, params=params, tool_names=tw.TOOLS)
        return [[t.ids, t.mask, t.finish, [round(x, 3) for x in t.logprobs]] for t in trajs]

    result = {"hf": run(HFEngine(model, tokenizer)), "vllm": run(vllm)}
    torch.manual_seed(1)
    with torch.no_grad():   # a modest update, as one optimizer step would make; the tied embeddings included
        for name, p in model.named_parameters():
            if "mlp" in name or "embed_tokens" in name:
                p.add_(torch.randn_like(p) * 0.3)
    vllm.load_weights(model.named_parameters())
    result["hf_new"], result["vllm_new"] = run(HFEngine(model, tokenizer)), run(vllm)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
