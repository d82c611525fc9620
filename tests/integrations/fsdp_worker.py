"""One rank of the FSDP2 test (test_hf_fsdp.py).

Run by the test as two processes (RANK 0 and 1, WORLD_SIZE 2, gloo on CPU). Each rank builds the
same tiny prefix-tuned Llama, shards it with `fully_shard` (every decoder layer, then the root;
in one case the prefix encoder gets a unit of its own), trains one step on its half of a fixed
batch and writes what it sees, gathered whole:

    <case>/grad/<name>           the prefix gradient after backward (FSDP2 reduces it)
    <case>/step/<name>           the prefix after one AdamW step
    <case>/expected_grad/<name>  the same two, computed in this process without FSDP: the mean of
    <case>/expected_step/<name>  the two halves' gradients, and the step it gives
    <case>/sharded               1 if the prefix was a DTensor sharded over the ranks
    <case>/frozen_grads          how many frozen parameters got a gradient (must be 0)
    saved/<name>, loaded/<name>  what save_prefix wrote from the sharded model, and what
                                 load_prefix put back into a freshly sharded one
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_testing import padded_batch, tiny_model  # noqa: E402
from prefix_attn.integrations.transformers import add_prefix_tuning, load_prefix, save_prefix  # noqa: E402

CASES = {  # name: (checkpointing, prefix_projection, the encoder is an FSDP unit of its own)
    "root": (False, False, False),
    "root_gc": (True, False, False),
    "root_mlp": (False, True, False),
    "own_unit": (False, False, True),  # the table's views must outlive the unit's reshard
}
LR = 1e-2


def build(projection: bool, prefix_seed: int = 3):
    model = tiny_model("llama")
    torch.manual_seed(prefix_seed)
    add_prefix_tuning(model, 4, prefix_projection=projection, encoder_hidden_size=16 if projection else None)
    model.train()
    return model


def shard(model, own_unit: bool):
    from torch.distributed.fsdp import fully_shard

    if own_unit:
        fully_shard(model.prefix_encoder)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def whole(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def step(model, batches, checkpointing: bool):
    """Backward over `batches` (their gradients averaged), then one AdamW step on the prefix."""
    if checkpointing:
        model.gradient_checkpointing_enable()
    prefix = dict(model.prefix_encoder.named_parameters())
    for ids, mask in batches:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss / len(batches)
        loss.backward()
    grads = {name: whole(p.grad) for name, p in prefix.items()}
    torch.optim.AdamW(prefix.values(), lr=LR).step()
    return grads, {name: whole(p) for name, p in prefix.items()}


def main(out_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ids, mask = padded_batch(batch=4, length=10, seed=7)
    halves = list(zip(ids.chunk(world), mask.chunk(world)))
    results = {}
    for case, (checkpointing, projection, own_unit) in CASES.items():
        expected_grad, expected_step = step(build(projection), halves, checkpointing)
        model = shard(build(projection), own_unit)
        weight = next(model.prefix_encoder.parameters())
        results[f"{case}/sharded"] = torch.tensor(int(isinstance(weight, DTensor) and weight.placements[0].is_shard()))
        grad, after = step(model, [halves[rank]], checkpointing)
        frozen = [n for n, p in model.named_parameters() if not n.startswith("prefix_encoder") and p.grad is not None]
        results[f"{case}/frozen_grads"] = torch.tensor(len(frozen))
        for name in grad:
            results[f"{case}/grad/{name}"] = grad[name]
            results[f"{case}/step/{name}"] = after[name]
            results[f"{case}/expected_grad/{name}"] = expected_grad[name]
            results[f"{case}/expected_step/{name}"] = expected_step[name]
        if case == "root":
            saved = os.path.join(out_dir, "prefix")
            save_prefix(model, saved)  # every rank: a collective gather; rank 0 writes
            dist.barrier()
            from safetensors.torch import load_file

            for name, t in load_file(os.path.join(saved, "prefix_model.safetensors")).items():
                results[f"saved/{name}"] = t
            fresh = shard(build(projection, prefix_seed=99), own_unit)
            load_prefix(fresh, saved)
            for name, p in fresh.prefix_encoder.named_parameters():
                results[f"loaded/{name}"] = whole(p)
            # the loaded model trains on: its forward and backward run on the loaded shards
            fresh(input_ids=halves[rank][0], attention_mask=halves[rank][1], labels=halves[rank][0]).loss.backward()
            results["loaded/grad_finite"] = torch.tensor(int(torch.isfinite(whole(fresh.prefix_encoder.weight.grad))
                                                             .all()))
    from safetensors.torch import save_file

    save_file(results, os.path.join(out_dir, f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the results are written; don't let interpreter teardown (threads, gloo) hang the test
