"""SFT: rendering equals the rollout's format, the loss trains only mask-1 tokens and decreases, teacher data."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import toy_model
import toy_world as tw
from qa_data import write_jsonl
from atomic_thought import system_prompt
from engine import SamplingParams
from retrievers import BM25Retriever
from tools import Tools
from search_env import rollout
from grpo import collate
from sft import first_turn, load_examples, sft_loss, train_sft, training_example
from search_env import render_conversation
from test_grpo import keep_lm_head_input
from teacher_data import ChatTeacherEngine, make_teacher_data
from toy_world import ToyTeacherEngine


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    world = tw.build_world(0, tw.WorldConfig(n_train=60, n_dev=10, n_test=20, n_extra_people=20))
    tokenizer = tw.build_tokenizer(world, cache_dir=tmp_path_factory.mktemp("tok"))
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_jsonl(world.corpus, corpus)
    tools = Tools(BM25Retriever(corpus), topk=tw.TOPK, tokenizer=tokenizer)
    return world, tokenizer, tools


def teacher_rows(env, n=24, **flaws):
    world, tokenizer, tools = env
    questions = world.splits["train"][:n]
    teacher = ToyTeacherEngine(tokenizer, questions, premature_rate=flaws.get("premature_rate", 0.0),
                               wrong_search_rate=flaws.get("wrong_search_rate", 0.0))
    return make_teacher_data(teacher, tools, questions, tokenizer=tokenizer, params=SamplingParams(),
                             system=system_prompt(tw.TOOLS), tool_names=tw.TOOLS,
                             min_f1=flaws.get("min_f1", 0.0))


def test_rendered_sft_ids_and_mask_equal_the_rollouts(env):
    world, tokenizer, tools = env
    questions = world.splits["train"][:6]
    teacher = ToyTeacherEngine(tokenizer, questions, premature_rate=0.3, wrong_search_rate=0.3)
    trajs = rollout(teacher, tools, questions, tokenizer=tokenizer, params=SamplingParams(), tool_names=tw.TOOLS)
    rows, _ = teacher_rows(env, n=6, premature_rate=0.3, wrong_search_rate=0.3)
    for t, row in zip(trajs, rows):
        p_ids, ids, mask = render_conversation(tokenizer, row["messages"])
        assert (p_ids, ids, mask) == (t.prompt_ids, t.ids, t.mask)


def test_masked_tokens_get_no_gradient_and_do_not_change_the_loss(env):
    world, tokenizer, _ = env
    rows, _ = teacher_rows(env, n=4)
    examples = [render_conversation(tokenizer, r["messages"]) for r in rows]
    batch = [(p + ids, [0] * len(p) + m) for p, ids, m in examples]
    input_ids, attention_mask, loss_mask = collate(batch, tokenizer.pad_token_id)
    model = toy_model.build_tiny_model(tokenizer)
    # token_logprobs makes no (B, T, V) logits; lm_head's input row t (the final hidden state) feeds only the
    # prediction of token t+1, so its gradient row is zero exactly when that prediction's logit gradient is.
    captured = keep_lm_head_input(model)
    sft_loss(model, input_ids, attention_mask, loss_mask).backward()
    grad = captured["hidden"].grad                                   # (B, T, H): row t predicts token t+1
    predicts_masked = loss_mask[:, 1:] == 0
    assert grad[:, :-1][predicts_masked].abs().max() == 0
    assert grad[:, :-1][~predicts_masked].abs().max() > 0
    # Changing a masked token that nothing later depends on (the final glue) leaves the loss unchanged.
    with torch.no_grad():
        base = sft_loss(model, input_ids, attention_mask, loss_mask)
        changed = input_ids.clone()
        last = attention_mask[0].sum() - 1
        assert loss_mask[0, last] == 0
        changed[0, last] = (changed[0, last] + 1) % len(tokenizer)
        assert torch.equal(sft_loss(model, changed, attention_mask, loss_mask), base)


def test_sft_loss_decreases_on_toy_teacher_data(env):
    world, tokenizer, _ = env
    rows, counts = teacher_rows(env, n=48, premature_rate=0.5)
    assert counts["kept"] == 48
    examples = [training_example(tokenizer, r["messages"]) for r in rows]
    torch.manual_seed(0)
    model = toy_model.build_tiny_model(tokenizer)
    losses = train_sft(model, examples, pad_id=tokenizer.pad_token_id, steps=30, batch_size=8, lr=3e-3, log=None)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3


def test_first_turn_keeps_the_prompt_and_the_first_assistant_turn_only(env):
    world, tokenizer, _ = env
    rows, _ = teacher_rows(env, n=6, premature_rate=0.0)
    for r in rows:
        ids, mask = training_example(tokenizer, r["messages"])
        cut_ids, cut_mask = first_turn((ids, mask))
        assert ids[:len(cut_ids)] == cut_ids and mask[:len(cut_mask)] == cut_mask
        assert cut_mask[-1] == 1 and mask[len(cut_mask)] == 0                    # a whole trained span, then stop
        trained = tokenizer.decode([t for t, m in zip(cut_ids, cut_mask) if m])
        assert trained.count("<tool_call>") == 1 and "<answer>" not in trained
    with pytest.raises(ValueError):
        first_turn(([1, 2], [0, 0]))


def test_teacher_data_filter_counts(env):
    rows, counts = teacher_rows(env, n=30, premature_rate=1.0, min_f1=0.5)
    n_two_hop = sum(r["metadata"]["type"] != "city" for r in rows)
    assert counts["generated"] == 30 and counts["kept"] == len(rows) and counts["low_f1"] > 0
    assert all(r["f1"] >= 0.5 for r in rows) and n_two_hop < 20
    row = rows[0]
    assert [m["role"] for m in row["messages"]][:3] == ["system", "user", "assistant"]


def test_load_examples_names_file_and_line_of_a_bad_row(env, tmp_path):
    _, tokenizer, _ = env
    rows, _ = teacher_rows(env, n=2)
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + '{"question": "no messages"}\n')
    with pytest.raises(ValueError, match=r"sft.jsonl:2"):
        load_examples(str(path), tokenizer)


def test_chat_teacher_turns_a_chat_endpoint_into_teacher_trajectories(env):
    world, tokenizer, tools = env
    q = next(q for q in world.splits["train"] if q["metadata"]["type"] == "city")
    subject, answer = q["metadata"]["subject"], q["golden_answers"][0]
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            searched = any("<tool_response>" in m["content"] for m in body["messages"][2:])
            text = ("<think>\n<OBSERVATION> found </OBSERVATION>\n</think>\n<answer>" + answer if searched else
                    "<think>\n<ACTION> search </ACTION>\n</think>\n<tool_call>\n"
                    + json.dumps({"name": "web_search", "arguments": {"query": subject}}) + "\n")
            out = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        teacher = ChatTeacherEngine(f"http://127.0.0.1:{server.server_address[1]}", "teacher", tokenizer)
        rows, counts = make_teacher_data(teacher, tools, [q], tokenizer=tokenizer, params=SamplingParams(),
                                         system=system_prompt(tw.TOOLS), tool_names=tw.TOOLS, min_f1=1.0)
    finally:
        server.shutdown()
    assert counts["kept"] == 1 and rows[0]["f1"] == 1.0, counts
    # Tool results reach the teacher as the template renders them: a user turn holding <tool_response>.
    assert [m["role"] for m in seen[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert seen[1]["messages"][3]["content"].startswith("<tool_response>")
    assert "OBSERVATION" in seen[0]["messages"][0]["content"] and seen[0]["stop"] == ["</tool_call>", "</answer>"]


def test_sft_command_line_fine_tunes_and_saves_a_checkpoint(env, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    world, tokenizer, _ = env
    rows, _ = teacher_rows(env, n=6)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = toy_model.build_tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "sft.py"), "--data", str(tmp_path / "sft.jsonl"), "--model",
                           str(tmp_path / "init"), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), model.parameters()))


def test_micro_batches_hold_a_token_budget_and_give_the_gradient_of_the_whole_step(env):
    """SFT micro-batches are packed by padded tokens (a long row alone), and however the step is split the
    gradient is that of the step's token-mean."""
    from grpo import micro_batches
    from sft import sft_step
    world, tokenizer, _ = env
    rows, _ = teacher_rows(env, n=6)
    examples = [training_example(tokenizer, r["messages"]) for r in rows]
    examples.append((examples[0][0] * 3, examples[0][1] * 3))       # one row 3x longer than the others
    budget = 2 * max(len(ids) for ids, _ in examples[:-1])
    packed = micro_batches(examples, budget)
    assert sorted(len(ids) for mb in packed for ids, _ in mb) == sorted(len(ids) for ids, _ in examples)
    assert all(len(mb) * max(len(ids) for ids, _ in mb) <= budget or len(mb) == 1 for mb in packed)
    assert [len(ids) for ids, _ in packed[-1]] == [len(examples[-1][0])]   # longer than the budget: alone
    n_tokens = sum(sum(m) for _, m in examples)
    grads = []
    for tokens in (budget, 10 ** 6):
        model = toy_model.build_tiny_model(tokenizer, seed=0)
        sft_step(model, examples, pad_id=tokenizer.pad_token_id, micro_batch_tokens=tokens, n_tokens=n_tokens)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert len(micro_batches(examples, 10 ** 6)) == 1 < len(packed)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
