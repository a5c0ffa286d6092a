"""Level and LevelSet in plain PyTorch: glob resolution, errors, the engine in a hand-written loop, state."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import TinyNet, batches, clone, make_optimizer, max_abs_diff, reference_fit
from torch import nn

from nl_lightning import Level, LevelSet
from nl_lightning.levels import as_levels, resolve_levels

PERIODS = {"net.0.weight": 3, "net.0.bias": 3, "net.2.weight": 2}


def _levels():
    return [Level("slow", ["net.0.*"], every=3), Level("mid", ["net.2.weight"], every=2)]


def _engine_loop(model, book, steps, optimizer="adamw"):
    opt = make_optimizer(optimizer, model.parameters())
    data = batches()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model.loss(next(data)).backward()
        plan = book.prepare()
        opt.step()
        book.commit(plan)
    return opt


def test_level_defaults_and_single_glob():
    lvl = Level("slow", "backbone.*", every=4)
    assert lvl.params == ("backbone.*",)
    assert Level("fast", ["head.*"]).every == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="x", params=["a"], every=0), "every.*>= 1.*0"),
        (dict(name="x", params=["a"], every=-3), "every.*-3"),
        (dict(name="x", params=["a"], every=2.5), "every.*2.5"),
        (dict(name="x", params=["a"], every=True), "every.*True"),
        (dict(name="", params=["a"]), "non-empty string"),
        (dict(name=3, params=["a"]), "3"),
        (dict(name="x", params=[3]), r"glob.*3 \(int\)"),
        (dict(name="x", params=["a", None]), "glob.*None"),
        (dict(name="x", params=[]), "empty"),
        (dict(name="x", params=5), "list of glob strings.*5"),
    ],
)
def test_level_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Level(**kwargs)


def test_duplicate_level_names():
    with pytest.raises(ValueError, match="Two levels are named 'a'"):
        as_levels([Level("a", ["x"]), Level("a", ["y"], 2)])


def test_mapping_form_and_dict_entries():
    assert as_levels({"backbone.*": 8}) == (Level("backbone.*", ("backbone.*",), 8),)
    assert as_levels([{"name": "s", "params": ["p"], "every": 2}]) == (Level("s", ("p",), 2),)
    with pytest.raises(ValueError, match="unknown keys.*period"):
        as_levels([{"name": "s", "params": ["p"], "period": 2}])
    with pytest.raises(ValueError, match="empty"):
        as_levels([])


def test_glob_matching_nothing_names_the_glob_and_suggests():
    model = TinyNet()
    with pytest.raises(ValueError, match=r"'slow'.*'nett\.0\.\*' matches no parameter.*net\.0\.weight"):
        resolve_levels([Level("slow", ["nett.0.*"])], model.named_parameters())


def test_parameter_claimed_by_two_levels():
    model = TinyNet()
    levels = [Level("a", ["net.0.*"], 2), Level("b", ["*.weight"], 3)]
    with pytest.raises(ValueError, match=r"'net\.0\.weight' is matched by level 'a'.*and by level 'b'"):
        resolve_levels(levels, model.named_parameters())


def test_overlapping_globs_of_one_level_are_fine():
    model = TinyNet()
    matched = resolve_levels([Level("a", ["net.0.*", "*.0.weight"], 2)], model.named_parameters())
    assert [n for n, _ in matched["a"]] == ["net.0.weight", "net.0.bias"]


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        LevelSet(_levels(), TinyNet().named_parameters(), reduction="avg")


def test_engine_in_a_plain_loop_matches_reference():
    model = TinyNet()
    reference = clone(model)
    book = LevelSet(_levels(), model.named_parameters())
    opt = _engine_loop(model, book, 12)
    reference_fit(reference, PERIODS, 12, lambda m: [make_optimizer("adamw", m.parameters())])
    assert max_abs_diff(model, reference) == 0.0
    assert book.num_updates == {"slow": 4, "mid": 6}
    assert int(opt.state[model.net[0].weight]["step"]) == 4


def test_uncommitted_step_contributes_nothing():
    """A prepared step that never happened leaves clocks and buffers as they were."""
    model = TinyNet()
    book = LevelSet(_levels(), model.named_parameters())
    _engine_loop(model, book, 2)
    before = book.state_dict()
    model.loss(next(batches())).backward()
    book.prepare()  # ... and no optimizer step, no commit
    after = book.state_dict()
    assert before["levels"]["slow"]["count"] == after["levels"]["slow"]["count"] == 2
    for name, buf in before["levels"]["slow"]["buffers"].items():
        assert torch.equal(buf, after["levels"]["slow"]["buffers"][name])


def test_gradients_missing_for_part_of_a_chunk_count_as_zero():
    """A parameter without a gradient on some steps of its chunk steps on sum / C of what it got."""
    w = nn.Parameter(torch.zeros(3))
    book = LevelSet([Level("w", ["w"], every=3)], [("w", w)])
    grads = [torch.tensor([1.0, 2.0, 3.0]), None, torch.tensor([3.0, 0.0, 0.0])]
    for i, g in enumerate(grads):
        w.grad = None if g is None else g.clone()
        plan = book.prepare()
        if i < 2:
            assert w.grad is None
        else:
            assert torch.allclose(w.grad, torch.tensor([4.0, 2.0, 3.0]) / 3)
        book.commit(plan)
    assert book.num_updates == {"w": 1}


def test_bf16_gradients_buffer_in_fp32():
    """1 + 2^-8 + 2^-8 summed in bf16 rounds to 1 twice; the fp32 buffer keeps 1 + 2^-7 and rounds once, at the end."""
    w = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    book = LevelSet([Level("w", ["w"], every=3)], [("w", w)])
    for g in (1.0, 2**-8):
        w.grad = torch.full((4,), g, dtype=torch.bfloat16)
        book.commit(book.prepare())
    assert book.state_dict()["levels"]["w"]["buffers"]["w"].dtype == torch.float32
    w.grad = torch.full((4,), 2**-8, dtype=torch.bfloat16)
    book.prepare()
    assert w.grad.dtype == torch.bfloat16
    assert torch.equal(w.grad, torch.full((4,), (1 + 2**-7) / 3).to(torch.bfloat16))
    assert not torch.equal(w.grad, torch.full((4,), 1 / 3).to(torch.bfloat16))


def test_state_dict_round_trip_continues_identically():
    """Save mid-chunk through torch.save / torch.load(weights_only=True), restore into a fresh engine and model."""
    model = TinyNet()
    book = LevelSet(_levels(), model.named_parameters())
    opt = _engine_loop(model, book, 4)
    buffer = io.BytesIO()
    torch.save({"levels": book.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buffer)

    data = batches()
    for _ in range(4):
        next(data)

    def continue_run(m, b, o):
        for _ in range(5):
            o.zero_grad(set_to_none=True)
            m.loss(next(data)).backward()
            plan = b.prepare()
            o.step()
            b.commit(plan)

    continue_run(model, book, opt)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = TinyNet(seed=3)
    restored.load_state_dict(saved["model"])
    restored_book = LevelSet(_levels(), restored.named_parameters())
    result = restored_book.load_state_dict(saved["levels"])
    assert result == ([], [], [])
    restored_opt = make_optimizer("adamw", restored.parameters())
    restored_opt.load_state_dict(saved["opt"])
    data = batches()
    for _ in range(4):
        next(data)
    continue_run(restored, restored_book, restored_opt)
    assert max_abs_diff(model, restored) == 0.0
    assert restored_book.num_updates == book.num_updates


def test_load_state_dict_strictness():
    model = TinyNet()
    book = LevelSet(_levels(), model.named_parameters())
    _engine_loop(model, book, 4)
    state = book.state_dict()
    other = LevelSet([Level("slow", ["net.0.*"], every=5)], model.named_parameters())
    with pytest.raises(ValueError, match=r"unexpected \['mid'\].*changed \['slow: every 3 -> 5'\]"):
        other.load_state_dict(state)
    result = other.load_state_dict(state, strict=False)
    assert result.unexpected == ["mid"] and result.changed == ["slow: every 3 -> 5"] and result.missing == []
    assert other.counts == {"slow": 1}
