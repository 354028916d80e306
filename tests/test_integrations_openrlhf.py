"""care_kernels.integrations.openrlhf against OpenRLHF 0.11.2's own code.

OpenRLHF's package imports Ray, DeepSpeed, flash-attn and peft at the top, so its model files
(openrlhf/models/{utils,ring_attn_utils,actor}.py) are loaded here on their own, with empty stand-ins for those
four only while the files are executed (the code paths compared never call them). `pip install --no-deps
openrlhf==0.11.2` (CI does) enables the comparisons; without it only the float64 reference below runs.
Compared: `log_probs_from_hidden` with `log_probs_from_logits` / `compute_entropy` (eager), and the patched
`Actor.forward` with OpenRLHF's on a tiny Qwen2 and a tiny Qwen2.5-VL with images: action log-probs, entropy and
every parameter's gradient.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from care_kernels.integrations import openrlhf as ck_openrlhf
from care_kernels.reference.naive import naive_linear_logprobs


def test_log_probs_from_hidden_matches_float64_reference():
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight, bias = (0.5 * torch.randn(60, 16)).requires_grad_(), torch.randn(60)
    labels = torch.randint(0, 60, (2, 7))
    log_probs, entropy = ck_openrlhf.log_probs_from_hidden(hidden, weight, labels, 0.7, bias, return_entropy=True)
    truth_lp, truth_ent = naive_linear_logprobs(hidden.double(), weight.double(), labels, bias.double(),
                                                temperature=0.7)
    assert log_probs.shape == entropy.shape == (2, 7) and log_probs.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(log_probs.double(), truth_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), truth_ent, atol=1e-5, rtol=1e-5)


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _unused(*args, **kwargs):  # pragma: no cover - never reached on the compared paths
    raise AssertionError("an OpenRLHF dependency stand-in was called")


@pytest.fixture(scope="module")
def openrlhf_models():
    """OpenRLHF 0.11.2's models/{utils,ring_attn_utils,actor}.py as modules of a stand-in package, or a skip."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenRLHF is not installed (pip install --no-deps openrlhf==0.11.2)")
    models_dir = Path(list(spec.submodule_search_locations)[0]) / "models"
    import transformers.integrations.deepspeed  # noqa: F401 - decides "no DeepSpeed" before the stand-in exists
    stand_ins = {
        "deepspeed": _stub("deepspeed"),
        "peft": _stub("peft", LoraConfig=_unused, TaskType=types.SimpleNamespace(CAUSAL_LM="CAUSAL_LM"),
                      get_peft_model=_unused),
        "peft.tuners": _stub("peft.tuners"),
        "peft.tuners.lora": _stub("peft.tuners.lora", LoraLayer=type("LoraLayer", (), {})),
        "flash_attn": _stub("flash_attn"),
        "flash_attn.bert_padding": _stub("flash_attn.bert_padding", index_first_axis=_unused, pad_input=_unused,
                                         rearrange=_unused, unpad_input=_unused),
        "flash_attn.utils": _stub("flash_attn.utils"),
        "flash_attn.utils.distributed": _stub("flash_attn.utils.distributed", all_gather=_unused),
    }
    package = types.ModuleType("_openrlhf_models")
    package.__path__ = [str(models_dir)]
    loaded = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, module in {**stand_ins, "_openrlhf_models": package}.items():
            patch.setitem(sys.modules, name, module)
        for name in ("utils", "ring_attn_utils", "actor"):
            full = f"_openrlhf_models.{name}"
            module_spec = importlib.util.spec_from_file_location(full, models_dir / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            patch.setitem(sys.modules, full, module)
            module_spec.loader.exec_module(module)
            loaded[name] = module
    compiled = loaded["utils"].compute_entropy  # @torch.compile in OpenRLHF: its own function, run eagerly here
    eager = getattr(compiled, "_torchdynamo_orig_callable", None) or compiled.__wrapped__
    loaded["utils"].compute_entropy = loaded["actor"].compute_entropy = eager
    return types.SimpleNamespace(**loaded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_from_hidden_matches_openrlhf(openrlhf_models, dtype):
    hidden = torch.randn(3, 5, 16, dtype=dtype)
    weight = (0.5 * torch.randn(80, 16)).to(dtype)
    labels = torch.randint(0, 80, (3, 5))
    for temperature in (1.0, 0.6):
        logits = (hidden @ weight.T).float()  # what OpenRLHF's actor hands it: logits cast to float32
        theirs = openrlhf_models.utils.log_probs_from_logits(logits.clone(), labels, temperature)
        their_entropy = openrlhf_models.utils.compute_entropy(logits / temperature)
        ours, entropy = ck_openrlhf.log_probs_from_hidden(hidden, weight, labels, temperature, return_entropy=True)
        tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(ours, theirs, **tolerance)
        torch.testing.assert_close(entropy, their_entropy, **tolerance)


def tiny_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.2, pad_token_id=0, eos_token_id=1)
    return Qwen2ForCausalLM(config).float()


def their_actor(openrlhf_models, model, temperature, vlm=False):
    actor = openrlhf_models.actor.Actor(model, temperature=temperature)
    actor.packing_samples = False  # set by Actor.__init__ only when it loads the model from a path
    if vlm:
        actor.is_vlm, actor._vlm_config = True, model.config
    return actor


def forward_and_grads(actor, sequences, action_mask, attention_mask, **mm_inputs):
    actor.model.zero_grad()
    log_probs, output = actor(sequences, action_mask, attention_mask=attention_mask, return_output=True,
                              return_entropy=True, **mm_inputs)
    weights = torch.linspace(-1, 1, log_probs.numel()).view_as(log_probs)
    entropy = output.entropy[:, -action_mask.shape[1]:]
    ((log_probs * weights).sum() + 0.1 * (entropy * action_mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in actor.model.named_parameters() if p.grad is not None}
    return log_probs.detach(), output.entropy.detach(), grads


def assert_same(ours, theirs):
    (lp, ent, grads), (their_lp, their_ent, their_grads) = ours, theirs
    assert lp.shape == their_lp.shape and ent.shape == their_ent.shape and lp.dtype == their_lp.dtype
    torch.testing.assert_close(lp, their_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, their_ent, atol=1e-5, rtol=1e-5)
    assert grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_patched_actor_matches_openrlhf_text(openrlhf_models, monkeypatch):
    actor = their_actor(openrlhf_models, tiny_qwen2(), temperature=0.7)
    sequences = torch.randint(2, 97, (3, 12))
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :3] = 0  # left-padded prompt
    attention_mask[1, -2:] = 0  # right-padded response
    action_mask = attention_mask[:, -5:].clone()
    theirs = forward_and_grads(actor, sequences, action_mask, attention_mask)
    assert (theirs[0][1, -2:] == 0).all()

    calls = []
    real = ck_openrlhf.linear_logprobs
    monkeypatch.setattr(ck_openrlhf, "linear_logprobs", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    ck_openrlhf.patch_actor(actor)
    assert ck_openrlhf.is_patched(actor)
    assert_same(forward_and_grads(actor, sequences, action_mask, attention_mask), theirs)
    assert calls == [(3, 11, 32)]  # one pass over the T - 1 positions (the entropy covers them all)

    with torch.no_grad():  # the experience maker's call: action log-probs only, the actions alone scored
        their_lp = openrlhf_models.actor.Actor.forward(actor, sequences, action_mask, attention_mask)
        ours_lp = actor(sequences, action_mask, attention_mask)
    torch.testing.assert_close(ours_lp, their_lp, atol=1e-5, rtol=1e-5)
    assert calls[-1] == (3, 5, 32)
    with torch.no_grad():  # return_logprobs without action_mask: every position
        their_all = openrlhf_models.actor.Actor.forward(actor, sequences, attention_mask=attention_mask,
                                                        return_logprobs=True)
        ours_all = actor(sequences, attention_mask=attention_mask, return_logprobs=True)
    torch.testing.assert_close(ours_all, their_all, atol=1e-5, rtol=1e-5)
    ck_openrlhf.unpatch_actor(actor)
    assert not ck_openrlhf.is_patched(actor)


def test_patched_actor_class_matches_openrlhf_vlm_with_images(openrlhf_models):
    pytest.importorskip("torchvision", reason="Qwen2.5-VL's image processor needs torchvision")
    from grpo_care.tiny import byte_tokenizer, qwen2_5_vl_processor, tiny_qwen2_5_vl
    from PIL import Image

    processor = qwen2_5_vl_processor(byte_tokenizer())
    model = tiny_qwen2_5_vl(processor.tokenizer).float().train()
    prompts = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Colour?<|im_end|>\n"
               "<|im_start|>assistant\n"] * 2
    pictures = [[Image.new("RGB", (56, 56), "red")], [Image.new("RGB", (28, 56), "blue")]]
    encoded = processor(images=pictures, text=prompts, padding=True, return_tensors="pt")
    response = torch.randint(300, 500, (2, 4))
    sequences = torch.cat([encoded["input_ids"], response], 1)
    attention_mask = torch.cat([encoded["attention_mask"], torch.ones_like(response)], 1)
    action_mask = torch.ones_like(response)
    mm_inputs = {"pixel_values": encoded["pixel_values"], "image_grid_thw": encoded["image_grid_thw"]}

    actor_class = openrlhf_models.actor.Actor
    original = actor_class.forward
    actor = their_actor(openrlhf_models, model, temperature=1.0, vlm=True)
    theirs = forward_and_grads(actor, sequences, action_mask, attention_mask, **mm_inputs)
    assert any(n.startswith("model.visual") for n in theirs[2])
    try:
        ck_openrlhf.patch_actor_class(actor_class)
        assert ck_openrlhf.is_patched(actor)
        assert_same(forward_and_grads(actor, sequences, action_mask, attention_mask, **mm_inputs), theirs)
    finally:
        ck_openrlhf.unpatch_actor_class(actor_class)
    assert actor_class.forward is original and not ck_openrlhf.is_patched(actor)


def test_what_the_patched_forward_does_not_cover_is_refused():
    actor = torch.nn.Module()
    actor.model, actor.temperature = tiny_qwen2(), 1.0
    ck_openrlhf.patch_actor(actor, impl="torch")
    sequences, mask = torch.randint(2, 97, (1, 6)), torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(NotImplementedError, match=r"return the logits.*unpatch_actor"):
        actor(sequences, attention_mask=mask, return_output=True)
    with pytest.raises(ValueError, match="return_entropy needs return_output"):
        actor(sequences, mask[:, -2:], attention_mask=mask, return_entropy=True)
    actor.packing_samples = True
    with pytest.raises(NotImplementedError, match="packing_samples"):
        actor(sequences, mask[:, -2:], attention_mask=mask)
    actor.packing_samples = False
    actor.model.config.output_router_logits = True
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        actor(sequences, mask[:, -2:], attention_mask=mask)
    actor.model.config.output_router_logits = False
    actor.model.lm_head.weight.ds_id = 7  # what ZeRO-3 tags a partitioned parameter with
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        actor(sequences, mask[:, -2:], attention_mask=mask)
    with pytest.raises(ValueError, match="impl"):
        ck_openrlhf.patch_actor(actor, impl="cuda")
    with pytest.raises(TypeError, match="openrlhf.models.Actor"):
        ck_openrlhf.patch_actor(torch.nn.Linear(2, 2))


class _StubLoraModel(torch.nn.Module):
    """peft's LoraModel as OpenRLHF's LoRA actor holds it: `.model` is the HF model; its forward returns logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class _StubPeftModel(torch.nn.Module):
    """peft's PeftModelForCausalLM (peft is not installed): `base_model` is the LoraModel, `get_base_model()` the
    HF model, other attributes forwarded to it."""

    def __init__(self, model):
        super().__init__()
        self.base_model = _StubLoraModel(model)
        self.peft_config = {"default": types.SimpleNamespace(peft_type="LORA")}

    def get_base_model(self):
        return self.base_model.model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model.model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)


class _Lora(torch.nn.Module):
    """A LoRA-style layer: the frozen base Linear plus B @ A (as peft injects it into the HF model)."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = torch.nn.Linear(2, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.5)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_lora_actor_is_scored_through_its_adapters():
    """OpenRLHF's LoRA actor holds a PeftModel, whose `base_model` is peft's LoraModel (its forward returns logits:
    an AttributeError mid-step before); the backbone comes from get_base_model(), adapters included."""
    model = tiny_qwen2()
    for layer in model.model.layers:
        layer.self_attn.q_proj = _Lora(layer.self_attn.q_proj)
    sequences = torch.randint(2, 97, (2, 9))
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :2] = 0
    action_mask = torch.ones(2, 4)
    logits = model(sequences, attention_mask=attention_mask,
                   position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, :-1].double()
    truth = logits.log_softmax(-1).gather(-1, sequences[:, 1:, None])[..., 0][:, -4:]

    actor = torch.nn.Module()
    actor.model, actor.temperature = _StubPeftModel(model), 1.0
    ck_openrlhf.patch_actor(actor, impl="torch")
    with torch.no_grad():
        ours = actor(sequences, action_mask, attention_mask)
    torch.testing.assert_close(ours.double(), truth, atol=1e-5, rtol=1e-5)

    model.lm_head = _Lora(model.lm_head)  # an adapter on the head: its weight alone would drop B @ A
    with pytest.raises(NotImplementedError, match="LM head of Qwen2ForCausalLM carries a PEFT adapter"):
        actor(sequences, action_mask, attention_mask)
