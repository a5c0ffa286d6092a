"""to_cms on tiny random-weight Hugging Face causal LMs built from configs (no download): Llama, Qwen2 (gated
SwiGLU MLPs), GPT-2 (Conv1D MLP, NewGELU, output dropout), Gemma-style GeGLU, Phi-3 (fused gate_up_proj). At
inner_lr=0 the converted model is bitwise the original in eval and train mode, and greedy generation is unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nl_lightning.models.to_cms import CMSAdapter, cms_levels, to_cms  # noqa: E402

VOCAB = 64


def tiny(kind: str, **overrides):
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "num_hidden_layers": 2, "num_attention_heads": 4}
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(config), "transformer.h.*.mlp"
    cls = {"llama": "Llama", "qwen2": "Qwen2", "phi3": "Phi3"}[kind]
    config = getattr(transformers, f"{cls}Config")(
        **common, hidden_size=32, intermediate_size=48, num_key_value_heads=2, pad_token_id=0, **overrides
    )
    return getattr(transformers, f"{cls}ForCausalLM")(config), "model.layers.*.mlp"


CASES = [
    ("llama", {}, "glu_silu"),
    ("qwen2", {}, "glu_silu"),
    ("gpt2", {}, "gelu_new"),
    ("llama", {"hidden_act": "gelu_pytorch_tanh"}, "glu_gelu_tanh"),  # Gemma's GeGLU
    ("phi3", {}, "glu_silu"),  # fused gate_up_proj
]


@pytest.mark.parametrize(("kind", "overrides", "activation"), CASES)
def test_lr_zero_is_bitwise_the_original(kind, overrides, activation):
    model, target = tiny(kind, **overrides)
    converted = to_cms(copy.deepcopy(model), target, [2, 4], inner_lr=0.0)
    adapters = [m for m in converted.modules() if isinstance(m, CMSAdapter)]
    assert len(adapters) == 2 and all(a.cms.blocks[0].activation == activation for a in adapters)
    tokens = torch.randint(1, VOCAB, (2, 11))
    for train in (False, True):  # train mode: GPT-2's dropouts draw the same masks in the same order
        model.train(train), converted.train(train)
        torch.manual_seed(1)
        want = model(tokens).logits
        torch.manual_seed(1)
        assert torch.equal(converted(tokens).logits, want)
    model.eval(), converted.eval()
    prompt = tokens[:, :3]
    want = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(converted.generate(prompt, max_new_tokens=8, do_sample=False), want)


def test_writes_train_the_added_levels_of_a_frozen_llama():
    """ "Freeze the backbone, train the CMS levels": only the added levels receive gradients and move."""
    model, target = tiny("llama")
    model.requires_grad_(False)
    to_cms(model, target, [2, 4], inner_lr=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".cms.blocks.1." in n or n.endswith(".value") for n in trainable)  # level 0: frozen
    assert [lvl.name for lvl in cms_levels(model)][:2] == [
        "model.layers.0.mlp.cms.level_0",
        "model.layers.0.mlp.cms.level_1",
    ]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(1, VOCAB, (2, 12))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= trainable and "model.layers.1.mlp.cms.blocks.1.w2" in moved
