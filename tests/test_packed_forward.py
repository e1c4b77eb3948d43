"""The padding-free forward for BERT encoders (model_service/packed_bert.py) against the model's own padded
forward: same outputs within float noise, for every head it covers; other models keep the padded path."""

from __future__ import annotations

import pytest
import torch

from model_service import packed_bert
from model_service.backends import EagerBackend, PaddedEagerBackend
from model_service.batcher import pass_tokens_of, plan_groups
from model_service.packed_bert import attention_groups, packed_forward
from tests import model_factory

LENGTHS = [3, 17, 5, 30, 30, 1, 12]  # unsorted, with a one-token row and two rows of the longest length


def padded_batch(lengths, vocab: int, token_types: bool, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rows, longest = len(lengths), max(lengths)
    ids = torch.zeros((rows, longest), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, vocab, (n,), generator=generator)
        mask[i, :n] = 1
        types[i, n // 2:n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        batch["token_type_ids"] = types
    return batch


class Loaded:  # what the backends read from a loader.LoadedModel
    def __init__(self, model):
        self.model = model


def assert_same_at_real_positions(got: dict, want: dict, mask: torch.Tensor) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        actual = got[name]
        assert actual.shape == expected.shape, name
        if expected.ndim >= 2 and expected.shape[1] == mask.shape[1]:  # per token: padded positions may differ
            keep = mask.bool()
            actual, expected = actual[keep], expected[keep]
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("task", model_factory.TASKS)
@pytest.mark.parametrize("token_types", [False, True])
@pytest.mark.parametrize("onednn", [packed_bert.ONEDNN, False] if packed_bert.ONEDNN else [False])
def test_packed_forward_answers_like_the_padded_model(task, token_types, onednn, monkeypatch):
    monkeypatch.setattr(packed_bert, "ONEDNN", onednn)
    model, tokenizer = model_factory.build_encoder(task, seed=3)
    backend, padded = EagerBackend(Loaded(model)), PaddedEagerBackend(Loaded(model))
    assert backend.padding_free
    batch = padded_batch(LENGTHS, len(tokenizer), token_types)
    with torch.inference_mode():
        for hidden in (False, True):
            got, want = backend(batch, hidden), padded(batch, hidden)
            assert_same_at_real_positions(got, want, batch["attention_mask"])
        whole = {k: v[:, :30] for k, v in padded_batch([30, 30], len(tokenizer), token_types).items()}
        whole.pop("attention_mask")  # no mask: every position is a token
        assert_same_at_real_positions(backend(whole), padded(whole), torch.ones(2, 30))


def test_packed_forward_pads_nothing_but_attention(monkeypatch):
    """The per-token layers see only the rows' own tokens: count what the first query projection computes
    (through the module, so the hook sees it: oneDNN's products bypass the module call)."""
    monkeypatch.setattr(packed_bert, "ONEDNN", False)
    model, tokenizer = model_factory.build_encoder("text-classification", seed=3)
    seen = []
    handle = model.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        with torch.inference_mode():
            EagerBackend(Loaded(model))(padded_batch(LENGTHS, len(tokenizer), False))
    finally:
        handle.remove()
    assert seen == [sum(LENGTHS)]  # padded: len(LENGTHS) x 30


def test_models_it_does_not_cover_keep_the_padded_forward():
    model, _ = model_factory.build_gpt2(seed=0, n_positions=64)
    assert packed_forward(model) is None
    assert not EagerBackend(Loaded(model)).padding_free
    model, tokenizer = model_factory.build_encoder("text-classification", seed=3)
    backend = EagerBackend(Loaded(model))
    embeds = {"inputs_embeds": torch.randn(2, 4, model.config.hidden_size)}  # not token ids: the model's own path
    with torch.inference_mode():
        torch.testing.assert_close(backend(embeds)["logits"], model(**embeds).logits)


def test_attention_groups_bound_the_padding():
    assert attention_groups([10] * 8) == [(0, 8)]
    groups = attention_groups([4, 5, 6, 100, 120], waste_tokens=20)
    assert groups == [(0, 3), (3, 5)]
    for start, end in attention_groups(sorted(LENGTHS * 5), waste_tokens=16):
        lengths = sorted(LENGTHS * 5)[start:end]
        assert end - start == 1 or max(lengths) * len(lengths) - sum(lengths) <= 16


def test_padding_free_passes_group_rows_by_count_not_length():
    lengths = [8] * 16 + [120] * 16
    padded = plan_groups(lengths, max_rows=32, token_budget=100_000, overhead_tokens=64)
    assert padded == [(0, 16), (16, 32)]  # padding the short rows to 120 costs more than a second pass
    assert plan_groups(lengths, 32, 100_000, 64, padding_free=True) == [(0, 32)]
    assert pass_tokens_of(lengths, padding_free=True) == sum(lengths)
    assert pass_tokens_of(lengths, padding_free=False) == 32 * 120
    assert all(sum(lengths[s:e]) <= 1000 for s, e in plan_groups(lengths, 32, 1000, 64, padding_free=True))
