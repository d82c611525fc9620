"""The end-to-end cases where prefix attention is a large share of the work (harness/models.py):
their FLOP shares against the hand count written in benchmarks/GPU_NOTES.md, the bank case's
PEFT incumbent (one call per task) computing the same loss and gradients as our one batched call,
and every new case through bench_e2e.py at tiny shapes on CPU."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from hf_testing import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import bench_e2e  # noqa: E402
from harness import models as hm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
NEW = ("long_n8192", "prefix_p512", "bank", "generate_b128")


def test_the_new_cases_come_first_at_their_shapes():
    cases = {c.name: c for c in hm.gpu_cases()}
    assert [c.name for c in hm.gpu_cases()][:4] == list(NEW)
    assert (cases["long_n8192"].seq, cases["long_n8192"].prefix) == (8192, 128)
    assert (cases["prefix_p512"].seq, cases["prefix_p512"].prefix) == (2048, 512)
    assert cases["bank"].tasks == cases["bank"].batch == 64
    assert (cases["generate_b128"].batch, cases["generate_b128"].prefix) == (128, 128)
    tiny = [c.name for c in hm.gpu_cases(tiny=True)]
    assert tiny[:3] == list(NEW[:3]) and {c.name for c in hm.gpu_cases()} - set(NEW) <= set(tiny) | {"generate_b16"}
    targets = {t[0] for t in hm.GPU_TARGETS}
    assert {"long_n8192", "prefix_p512", "bank"} <= targets


def test_flop_share_matches_the_hand_count():
    """GPU_NOTES' table for the 1 B step at N 2048, P 128: 2.08 + 2.08 G of matmuls, 0.15 + 0.38 G
    of attention per token (11%); long context by the same formulas, written out here."""
    train = next(c for c in hm.gpu_cases() if c.name == "train")
    s = hm.flop_share(train)
    assert s["linear_gflop"] == pytest.approx(4.16, abs=0.01)
    assert s["attention_gflop"] == pytest.approx(0.53, abs=0.01)
    assert s["attention_share"] == pytest.approx(0.113, abs=0.002)
    long = next(c for c in hm.gpu_cases() if c.name == "long_n8192")
    attn = 3.5 * 4 * 32 * 64 * (128 + 8193 / 2) * 16 / 1e9
    assert hm.flop_share(long)["attention_gflop"] == pytest.approx(attn)
    assert hm.flop_share(long)["attention_share"] == pytest.approx(attn / (attn + 4.154), abs=1e-3)
    assert 0.3 < hm.flop_share(long)["attention_share"] > hm.flop_share(next(
        c for c in hm.gpu_cases() if c.name == "prefix_p512"))["attention_share"] > s["attention_share"]


def test_bank_incumbent_computes_the_same_step(monkeypatch):
    """With every task of our bank holding PEFT's prefix, our one batched call and PEFT's loop of
    one call per task give the same loss and the same prefix gradient (float32), so the bank case
    times the same work both ways."""
    base = hm.load_base("llama-1b", "cpu", torch.float32, tiny=True)
    case = hm.ModelCase("bank", "llama-1b", "train", 6, 12, 4, tasks=3)
    import copy

    ours = hm.prefix_tuned("ours", copy.deepcopy(base), case.prefix, 0, tasks=case.tasks)
    peft = hm.prefix_tuned("peft", copy.deepcopy(base), case.prefix, 0)
    with torch.no_grad():
        for t in range(1, case.tasks):
            ours.prefix_encoder.weight[:, :, t] = ours.prefix_encoder.weight[:, :, 0]
    # SGD at lr 1 in place of AdamW: the change of a trainable tensor is minus its gradient
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr: torch.optim.SGD(params, lr=1.0))
    losses, grads = {}, {}
    for name, model in (("ours", ours), ("peft", peft)):
        inputs = hm.make_inputs(case, case.batch, model)
        call = hm.make_call(model, case, inputs)
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        losses[name] = float(call())
        grads[name] = [b - p.detach() for p, b in zip(params, before)]
    assert losses["ours"] == pytest.approx(losses["peft"], rel=1e-5)
    ours_grad = grads["ours"][0]  # [L, 2, T, Hkv, P, D]
    L, _, T, H, P, D = ours_grad.shape
    for t in range(T):  # every task's rows reached its own entry of the bank
        assert ours_grad[:, :, t].abs().max() > 0
    peft_grad = grads["peft"][0].reshape(P, L, 2, H, D).permute(1, 2, 3, 0, 4)
    # the same loss of one shared prefix: the tasks' gradients add up to PEFT's
    torch.testing.assert_close(ours_grad.sum(dim=2), peft_grad, rtol=1e-4, atol=1e-6)
    hm.release(ours)


def test_new_cases_tiny_on_cpu(tmp_path):
    argv = ["--tiny", "--reps", "2", "--cases", "long_n8192", "prefix_p512", "bank", "--out", str(tmp_path)]
    assert bench_e2e.main(argv) == 0
    doc = json.loads((tmp_path / "e2e.json").read_text())
    rows = {(r["case"], r["impl"]): r for r in doc["rows"]}
    for case in NEW[:3]:
        assert rows[(case, "ours")]["tokens_per_s"] > 0 and rows[(case, "peft")]["tokens_per_s"] > 0
    assert rows[("bank", "ours")]["tasks"] == 4 and rows[("bank", "ours")]["batch"] == 4
    assert {t["case"] for t in doc["targets"] if t["met"] is not None} == set(NEW[:3])
