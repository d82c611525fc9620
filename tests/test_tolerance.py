"""The tolerance rule itself: tight enough to catch the bugs it is there to catch.

``check_against_reference`` allows err(ours) <= 2 * err(same-precision reference) + floor.
For gradients the floor adds ``recompute_rel_error``: the error a flash-style backward adds by
recomputing the scores. That term grows with the scores (amp = 30 makes it 1.2e-4 in float32 at
D = 64); out and lse, computed once as the reference computes them, do not get it. These tests
feed the check results that carry the small bugs a kernel could have (computed by the reference
on slightly wrong inputs, so no kernel needs mutating) and demand that it rejects each one, in
the large-score case and in the ordinary one. They also pin the term's size, so that it cannot
silently grow until it hides a bug.

Measured with real kernel mutations under TRITON_INTERPRET=1 (amp = 30 case of test_triton.py):
- no rescale of the accumulator on a new max: out err 5.6, bound 8.2e-5;
- causal off by one: out err 4.1;
- log2(e) in the backward rounded to fp16: dq err 3.5e-2, bound 2.9e-4;
- the forward's log2(e) rounded to 1.4426 (6.6e-5 relative): out err 9.5e-5, bound 8.2e-5,
  which is caught, but only just.
"""
import dataclasses
import math

import pytest
import torch

from attn_testing import Case as C
from attn_testing import FLOOR_REL, check_against_reference, make_inputs, reference_pair, run_attention

LARGE = C(B=2, Hq=2, Hkv=1, Nq=40, Nk=70, P=17, D=64, causal=True, amp=30)
ORDINARY = C(B=2, Hq=2, Hkv=1, Nq=40, Nk=70, P=17, D=64, causal=True)


def _visible(case):
    i = torch.arange(case.Nq)[:, None]
    j = torch.arange(case.Nk)[None, :]
    return i, j, case.Nk - case.Nq


def _bug_inputs(x, bug: str):
    """The same inputs, changed the way a kernel bug would change what it computes."""
    c = x.case
    i, j, off = _visible(c)
    if bug == "scale_rounded":  # a scale constant rounded to ~12 bits (relative 2.4e-4)
        scale = (c.scale or 1 / math.sqrt(c.D)) * (1 + 2.0**-12)
        return dataclasses.replace(x, case=dataclasses.replace(c, scale=scale))
    if bug == "diagonal_hidden":  # causal bound off by one: j < i + off
        return dataclasses.replace(x, attn_mask=j < i + off)
    if bug == "one_key_too_many":  # causal bound off by one the other way
        return dataclasses.replace(x, case=dataclasses.replace(c, causal=False), attn_mask=j <= i + off + 1)
    if bug == "prefix_key_dropped":  # the last prefix key's value zeroed (a tile bound off by one)
        pv = x.leaves["prefix_v"].detach().clone()
        pv[..., -1, :] = 0
        return dataclasses.replace(x, leaves={**x.leaves, "prefix_v": pv})
    raise KeyError(bug)


@pytest.mark.parametrize("case", [pytest.param(LARGE, id="amp30"), pytest.param(ORDINARY, id="amp1")])
@pytest.mark.parametrize("bug", ["scale_rounded", "diagonal_hidden", "one_key_too_many", "prefix_key_dropped"])
def test_bound_rejects_small_bugs(case, bug):
    x = make_inputs(case)
    lo, hi = reference_pair(x)
    check_against_reference(lo, lo, hi, case)  # the unchanged same-precision result passes
    buggy = run_attention(_bug_inputs(x, bug).cast(case.torch_dtype), "reference")
    with pytest.raises(AssertionError, match="err\\(ours\\)"):
        check_against_reference(buggy, lo, hi, case)


def test_recompute_term_size():
    """Unit-variance scores: the term stays below FLOOR_REL, so ordinary cases keep their bound.
    amp = 30: it is what the error analysis gives, sqrt(D) * 2^-24 * max scale * sum |q||k|."""
    _, hi = reference_pair(make_inputs(ORDINARY))
    assert 1e-6 < hi.recompute_rel < FLOOR_REL[torch.float32]
    _, hi = reference_pair(make_inputs(LARGE))
    assert 5e-5 < hi.recompute_rel < 3e-4
