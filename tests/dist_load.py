"""Run by tests/test_distributed.py under torchrun: `distributed.load_model` on every rank, compared with a plain
`from_pretrained` of the same folder. Writes OUT.rank<r> with what differs (nothing, when loading is right)."""
import sys

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from distributed import Dist, load_model, named_full_tensors


def main(model_dir: str, out: str) -> None:
    d = Dist()
    model = load_model(model_dir, d)                                  # rank 0 reads, the others receive
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = dict(plain.named_parameters())
    wrong = [name for name, t in named_full_tensors(model, torch.float32) if not torch.equal(t, expected[name])]
    buffers = dict(plain.named_buffers())
    wrong += [name for name, b in model.named_buffers() if not torch.equal(b, buffers[name])]
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():   # the sharded model's forward (a collective) gives the plain model's logits
        same = torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
    torch.save({"wrong": wrong, "same_logits": same, "sharded": sharded},
               f"{out}.rank{d.rank}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
