"""One rank of the DDP test (test_hf_training.py::test_ddp_prefix_gradients_agree).

Run by the test as two processes (RANK 0 and 1, WORLD_SIZE 2, gloo on CPU). Each rank trains a
tiny prefix-tuned Llama on its half of a fixed batch through DistributedDataParallel, with and
without gradient checkpointing, and saves its prefix gradient; rank 0 also saves the expected
gradient, the mean of the two halves' gradients computed without DDP.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_testing import padded_batch, tiny_model  # noqa: E402
from prefix_attn.integrations.transformers import add_prefix_tuning  # noqa: E402


def build():
    model = add_prefix_tuning(tiny_model("llama"), 4, prefix_projection=True, encoder_hidden_size=16)
    model.train()
    return model


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.prefix_encoder.parameters()])


def main(out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ids, mask = padded_batch(batch=4, length=10, seed=7)
    shards = list(zip(ids.chunk(world), mask.chunk(world)))
    results = {}
    for checkpointing in (False, True):
        model = build()
        if checkpointing:
            model.gradient_checkpointing_enable()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        shard_ids, shard_mask = shards[rank]
        ddp(input_ids=shard_ids, attention_mask=shard_mask, labels=shard_ids).loss.backward()
        results[f"ddp_gc{int(checkpointing)}"] = grads(model)
    if rank == 0:
        expected = None
        for shard_ids, shard_mask in shards:
            model = build()
            model(input_ids=shard_ids, attention_mask=shard_mask, labels=shard_ids).loss.backward()
            g = grads(model) / world
            expected = g if expected is None else expected + g
        results["expected"] = expected
    from safetensors.torch import save_file

    save_file(results, os.path.join(out_dir, f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the results are written; don't let interpreter teardown (threads, gloo) hang the test
