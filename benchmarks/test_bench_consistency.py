"""Every provider of a case computes the same thing (on a tiny head, in seconds), so the timings compare
equal work. Providers that compile on first use (Cut Cross-Entropy) are left out: compiling costs more
than the whole check."""

import cases
import providers
import pytest
import torch
from shapes import GROUP_CASES, HEADS, Head, Spec, device

TINY = Head("tiny", "tiny test head", 32, 300)
LOGPROB_CASES = ("forward", "fwd_bwd", "entropy", "dual", "grpo_head")


def _result(case: str, inputs, out):
    """What a provider computed: the gradients for backward cases, else its outputs, as float64 tensors."""
    if cases.needs_grad(case):
        return [inputs.hidden.grad.double(), inputs.weight.grad.double()]
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().double().reshape(-1) for o in outs if torch.is_tensor(o)]


def _runnable(case: str) -> list[str]:
    dev = device()
    names = []
    for name in providers.for_case(case):
        prov = providers.PROVIDERS[name]
        if prov.kind == "bare" or prov.compiles or not prov.available(case, dev)[0]:
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("case", LOGPROB_CASES + GROUP_CASES)
def test_providers_agree(case, monkeypatch):
    monkeypatch.setitem(HEADS, TINY.key, TINY)
    dev = device()
    names = _runnable(case)
    if len(names) < 2:
        pytest.skip(f"fewer than two providers of {case} can run here")
    head, n, dtype = ("groups", 64, "float32") if case in GROUP_CASES else (TINY.key, 16, "float32")
    results = {}
    for name in names:
        inputs = cases.make_inputs(Spec(case, name, head, n, dtype), dev)
        built = providers.build(name, case, inputs, dev)
        built.reset()
        results[name] = _result(case, inputs, built.run())
    ref_name = names[0]
    for name, got in results.items():
        ref = results[ref_name]
        assert len(got) >= 1 and len(got) == len(ref), (
            f"{name} returned {len(got)} tensors, {ref_name} {len(ref)}"
        )
        for i, (a, b) in enumerate(zip(got, ref)):
            assert a.shape == b.shape, (
                f"{case}: {name} output {i} has shape {tuple(a.shape)}, {ref_name} {tuple(b.shape)}"
            )
            err = (a - b).abs().max().item()
            assert err <= 1e-4 * (1 + b.abs().max().item()), (
                f"{case}: {name} differs from {ref_name} by {err:.3g}"
            )
