"""A tiny model for CPU runs: a byte-level BPE tokenizer that knows the agent's format, and a ~0.5M-parameter Qwen2.

Nothing here is the paper's (METHOD.md §10). `train_tokenizer` trains a BPE on any texts and adds the grammar's tags
(atomic_thought.STRUCTURAL_TAGS and CANONICAL_TAGS, with the whitespace the renderers put next to them) and the tool
call's fixed JSON start as single tokens, under a Qwen2.5-style ChatML template; `build_tiny_model` is Qwen2.5's
architecture at toy size, so the toy run takes the 7B model's code path. The toy world (toy_world.build_tokenizer)
and the real-run tests' tiny models are built with these.
"""
from __future__ import annotations

import os
from pathlib import Path

from atomic_thought import CANONICAL_TAGS, STRUCTURAL_TAGS

# Chat-format tokens: special (skipped by decode(skip_special_tokens=True)); end of turn doubles as EOS.
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The grammar's tags (atomic_thought's one vocabulary) as single, non-special tokens (they must survive decoding:
# parse_turn reads them).
FORMAT_TOKENS = tuple(f"<{c}{t}>" for t in STRUCTURAL_TAGS + CANONICAL_TAGS for c in ("", "/"))
# The same tags with the whitespace the renderers put next to them (atomic_thought.render_think / render_turn,
# the chat template), also one token each: a real BPE merges such whitespace, but added tokens cut it off into
# tokens of their own (" " and "\n" were a fifth of every sampled turn). Matching is leftmost-longest, so
# " </ACTION>\n" wins over "</ACTION>". None has text after a stop string, so a stop still ends on a token.
LAYOUT_TOKENS = (("<think>\n", "</think>\n", "<tool_call>\n", "\n</tool_call>", "<tool_response>\n",
                  "\n</tool_response>", " </answer>") + tuple(f" </{t}>\n" for t in CANONICAL_TAGS))
# A Qwen2.5-style chat template (system/user/assistant, tool results as a user turn in <tool_response>).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
# The fixed start of every tool call's JSON (atomic_thought.render_turn), one token of the toy tokenizer: the
# byte-level pre-tokenizer would split it into ~15 tokens that every turn would pay for in training and sampling.
TOOL_CALL_PREFIX = '{"name": "web_search", "arguments": {"query": "'


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on `texts` -> a transformers tokenizer with the ChatML `CHAT_TEMPLATE`.

    The grammar's tags (bare and with their whitespace, `LAYOUT_TOKENS`) and `TOOL_CALL_PREFIX` are added as single
    non-special tokens, so the model emits each in one step and decoding keeps it; the chat tokens are special.
    Used for the toy world's tokenizer and, on real text, for the tiny models of the real-run tests.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) + ["system\nuser\nassistant\n"] * 50    # the chat template's role names: one token each
    added = sorted(FORMAT_TOKENS + LAYOUT_TOKENS + (TOOL_CALL_PREFIX,), key=len, reverse=True)
    for tag in added:      # added tokens below: keep them out of the merges. The text after an added token is
        texts = [t.replace(tag, "\n") for t in texts]   # pre-tokenized on its own, like the text after a newline
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(added), special_tokens=list(CHAT_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def cached_tokenizer(path: Path, texts, vocab_size: int, one_token: list[str]):
    """`train_tokenizer(texts, vocab_size)` saved at `path`, or loaded from there when it exists. Each string of
    `one_token` must be a single token, else a RuntimeError says to raise vocab_size."""
    from transformers import AutoTokenizer
    if (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(path)
    tokenizer = train_tokenizer(texts, vocab_size)
    split = [s for s in one_token if len(tokenizer(s)["input_ids"]) != 1]
    if split:
        raise RuntimeError(f"vocab_size={vocab_size} too small: {split[:5]} are not one token each; raise vocab_size")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path) if not path.exists() else None   # atomic: a concurrent builder may have won
    return AutoTokenizer.from_pretrained(path)


def build_tiny_model(tokenizer, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 384, max_positions: int = 2048, seed: int = 0):
    """A randomly initialised `Qwen2ForCausalLM` of ~0.5M parameters (Qwen2.5-7B's architecture, tiny).

    Grouped-query attention (4 query heads sharing 2 KV heads) and tied embeddings as in small Qwen2.5s.
    Two layers, the fewest that can copy from context (a previous-token head feeding an induction head);
    four learnt no faster in the demo's SFT (LOG.md) and cost twice as much per step.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
