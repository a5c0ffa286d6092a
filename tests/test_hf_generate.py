"""generate() on transformers causal LMs converted by to_cms: the CMS state follows the key/value cache.

Tiny random-weight configs (no download). With writes on (inner_lr > 0, chunks of 2 and 4 tokens, so that writes
fall inside the generated span), cached greedy generation equals greedy decoding by a full forward pass of the whole
sequence at every step; calls that cannot continue the adapters' state raise.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nl_lightning.models import CMSAdapter, to_cms  # noqa: E402
from nl_lightning.models.hf_cms import install_generation_hooks  # noqa: E402

VOCAB = 64
NEW = 12
TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}


def make(arch: str, seed: int = 0):
    """A tiny random-weight causal LM and the glob of its FFNs."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **TOKENS)
        return transformers.GPT2LMHeadModel(config).eval(), "transformer.h.*.mlp"
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **TOKENS)  # fmt: skip
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval(), "model.layers.*.mlp"
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval(), "model.layers.*.mlp"


def converted(arch: str, inner_lr: float = 0.1, **kwargs):
    model, targets = make(arch)
    to_cms(model, targets, [2, 4], inner_lr=inner_lr, **kwargs)
    with torch.no_grad():  # targets that make the writes matter (to_cms starts them at 0, as untrained)
        for adapter in model.modules():
            if isinstance(adapter, CMSAdapter):
                for level in adapter.cms.blocks:
                    level.value.copy_(torch.eye(level.dim))
    return model


def prompt(batch: int = 1, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW)
    return model.generate(ids, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)


@torch.no_grad()
def full_forward_decoding(model, ids, steps: int = NEW):
    """Greedy decoding that re-reads the whole sequence at every step: the sequences and each step's logits."""
    logits = []
    for _ in range(steps):
        last = model(ids, use_cache=False).logits[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids, logits


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cached_generation_equals_full_forward_decoding(arch):
    model = converted(arch)
    assert hasattr(model, "_nl_cms_generation")  # to_cms installed the hooks on the PreTrainedModel
    ids = prompt()
    out = generate(model, ids)
    seq, logits = full_forward_decoding(model, ids)
    assert torch.equal(out.sequences, seq)
    assert max_diff(out.logits, logits) < 1e-5
    assert all(not a.carry_state for a in model.modules() if isinstance(a, CMSAdapter))  # restored after each call


def test_without_the_hooks_cached_generation_differs():
    """What the hooks fix: each cached step would start fresh fast weights and the logits drift from a full forward."""
    model = converted("llama")
    ids = prompt()
    _, logits = full_forward_decoding(model, ids)
    model._nl_cms_generation.remove()
    assert not hasattr(model, "_nl_cms_generation") and "_reorder_cache" not in model.__dict__
    out = generate(model, ids, max_new_tokens=NEW)
    assert max_diff(out.logits[:1], logits[:1]) < 1e-5  # the prompt's step reads everything in one call
    assert max_diff(out.logits, logits) > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_inner_lr_zero_generation_is_unchanged(arch):
    original, _ = make(arch)
    model = converted(arch, inner_lr=0.0)
    ids = prompt(batch=2)
    before, after = generate(original, ids), generate(model, ids)
    assert torch.equal(before.sequences, after.sequences)
    assert max_diff(before.logits, after.logits) < 1e-6


def test_use_cache_false_re_reads_every_step():
    model = converted("gpt2")
    ids = prompt()
    out = generate(model, ids, use_cache=False)
    seq, logits = full_forward_decoding(model, ids)
    assert torch.equal(out.sequences, seq)
    assert max_diff(out.logits, logits) < 1e-6


def test_beam_search_follows_the_cache_reordering():
    model = converted("llama")
    ids = prompt(batch=2)
    kwargs = dict(num_beams=3, max_new_tokens=8, output_scores=True)
    cached, uncached = generate(model, ids, **kwargs), generate(model, ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=0)
    # the beams were reordered: some beam continues another beam's earlier prefix
    assert bool((cached.beam_indices[:, 1:] != cached.beam_indices[:, :1]).any())


def test_beam_search_without_the_reorder_hook_is_refused():
    """A cache reordered behind the adapters' back (here: the model's `_reorder_cache` taken away) is detected."""
    model = converted("llama")
    del model.__dict__["_reorder_cache"]
    with pytest.raises(ValueError, match="reordered"):
        generate(model, prompt(batch=2), num_beams=3, max_new_tokens=8)


def test_left_padded_batch_equals_a_full_forward_of_the_padded_batch():
    model = converted("qwen2")
    ids = prompt(batch=2, length=6)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = generate(model, ids, attention_mask=mask)
        generate(model, ids, attention_mask=mask)
    padding = [w for w in caught if "pad tokens" in str(w.message)]
    assert len(padding) == 1  # once per model
    uncached = generate(model, ids, attention_mask=mask, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert max_diff(cached.logits, uncached.logits) < 1e-5


@torch.no_grad()
def test_a_cache_the_state_does_not_continue_is_refused():
    model = converted("gpt2")
    first = model(prompt(length=5), use_cache=True)
    model(prompt(length=7, seed=2))  # another sequence in between: the adapters' state is now that one's
    nxt = torch.tensor([[3]])
    with pytest.raises(ValueError, match="holds 5 tokens.*read 7 tokens"):
        model(nxt, cache=first.cache)
    # a cache of the same length from another sequence
    first = model(prompt(length=5), use_cache=True)
    model(prompt(length=5, seed=3), use_cache=True)
    with pytest.raises(ValueError, match="not the one the model's previous call returned"):
        model(nxt, cache=first.cache)
    # a cache that dropped tokens
    out = model(prompt(length=5), use_cache=True)
    out.cache.crop(-2)
    with pytest.raises(ValueError, match="holds 3 tokens.*read 5 tokens"):
        model(nxt, cache=out.cache)
    # the continuation that is right works, and after a refused call the adapters are as configured
    out = model(prompt(length=5), use_cache=True)
    model(nxt, cache=out.cache)
    assert all(not a.carry_state for a in model.modules() if isinstance(a, CMSAdapter))


@torch.no_grad()
def test_reordered_rows_are_refused():
    model = converted("llama")
    out = model(prompt(batch=2), use_cache=True)
    out.cache.reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="rows were reordered"):
        model(torch.tensor([[3], [4]]), cache=out.cache)


@torch.no_grad()
def test_hooks_are_idempotent_and_restore_carry_state_on_errors():
    model = converted("llama")
    install_generation_hooks(model)
    install_generation_hooks(model)
    ours = [h for h in model._forward_pre_hooks.values() if getattr(h, "__self__", None) is model._nl_cms_generation]
    assert len(model._forward_pre_hooks) == len(ours) == 1
    adapter = model.model.layers[0].mlp
    assert isinstance(adapter, CMSAdapter) and len(adapter._forward_pre_hooks) == 1
    cache = model(prompt(), use_cache=True).cache
    with pytest.raises(IndexError):
        model(torch.tensor([[VOCAB + 5]]), cache=cache)  # fails inside the forward
    assert not adapter.carry_state
    with pytest.raises(ValueError, match="holds 5 tokens.*has no state"):  # a failed call's state is not continued
        model(torch.tensor([[3]]), cache=cache)
    ids = prompt()
    out = generate(model, ids)
    assert torch.equal(out.sequences, full_forward_decoding(model, ids)[0])


@torch.no_grad()
def test_carry_state_true_keeps_streaming():
    """Adapters built with carry_state=True continue their stream across calls that begin a sequence."""
    model = converted("llama", carry_state=True)
    reference = converted("llama", carry_state=True)
    reference._nl_cms_generation.remove()
    a, b = prompt(length=6), prompt(length=5, seed=2)
    for m in (model, reference):
        m(a)
    torch.testing.assert_close(model(b).logits, reference(b).logits, atol=0, rtol=0)
    assert all(m.carry_state for m in model.modules() if isinstance(m, CMSAdapter))


def test_states_are_kept_only_for_calls_that_can_be_continued():
    """A training step, or a call that returns no cache, leaves no fast weights behind (they would only hold memory)."""
    model = converted("gpt2")
    adapter = model.transformer.h[0].mlp
    ids = prompt()
    model.train()
    model(ids, labels=ids).loss.backward()
    assert adapter.state is None
    model.eval()
    with torch.no_grad():
        model(ids, use_cache=False)
        assert adapter.state is None
        out = model(ids, use_cache=True)
        assert adapter.state is not None
        model(torch.tensor([[3]]), cache=out.cache)  # continued
    model.train()
    out = model(ids, use_cache=True)
    with pytest.raises(ValueError, match="has no state.*training mode"):
        model(torch.tensor([[3]]), cache=out.cache)
