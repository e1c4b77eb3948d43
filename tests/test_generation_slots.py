"""The running batch's slot cache (model_service/generation/slots.py): rows joining and leaving
never mix one sequence's keys and values with another's.

- In isolation: random keys and values per row, checked against a plain Python record of
  every row's columns after each join, step and departure (rows move into holes, buffers
  are re-laid out as they fill).
- On real tiny models: many sequences with different prompt lengths and lengths to
  generate join and leave a running batch one by one (rows leave from the middle, a long
  prompt joins a batch of short ones); each must produce exactly what model.generate
  produces for it alone.
"""

from __future__ import annotations

import random

import pytest
import torch

from model_service.generation.batch import DecodeBatch, GenerationModel
from model_service.generation.slots import SlotCache
from tests.generation_helpers import BUILDERS, reference_generate
from tests.test_generation_units import make_seq

LAYERS, HEADS, DIM = 2, 2, 3


def _check(cache: SlotCache, record: list[list[torch.Tensor]]) -> None:
    """Row i's own columns (mask 1), in order, are exactly record[i] in every layer."""
    assert cache.rows == len(record)
    mask = cache.attention_mask.bool()
    for row, columns in enumerate(record):
        assert int(mask[row].sum()) == len(columns)
        assert bool(mask[row, -1])  # every row ends at the newest column (left padding)
        for layer_index, layer in enumerate(cache.layers):
            assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()  # masked columns weigh 0
            own_keys = layer.keys[row][:, mask[row]]          # [heads, n, dim]
            own_values = layer.values[row][:, mask[row]]
            want = torch.stack([c[layer_index] for c in columns], dim=2)  # [2, heads, n, dim]
            assert torch.equal(own_keys, want[0]) and torch.equal(own_values, want[1])


def _new_rows(rng: random.Random, lengths: list[int]):
    """Left-padded prefill keys / values for rows of `lengths` tokens, and each row's columns."""
    width = max(lengths)
    kv = [(torch.zeros(len(lengths), HEADS, width, DIM), torch.zeros(len(lengths), HEADS, width, DIM))
          for _ in range(LAYERS)]
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    records = []
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
        columns = []
        for _ in range(n):
            columns.append([torch.randn(2, HEADS, DIM) for _ in range(LAYERS)])
        for col, column in enumerate(columns):
            for layer_index, (keys, values) in enumerate(kv):
                keys[row, :, width - n + col] = column[layer_index][0]
                values[row, :, width - n + col] = column[layer_index][1]
        records.append(columns)
    return kv, mask, records


def test_rows_keep_their_own_keys_and_values_through_joins_steps_and_departures():
    rng = random.Random(7)
    torch.manual_seed(7)
    cache = SlotCache(LAYERS)
    record: list[list] = []
    relayouts = 0
    for _ in range(60):
        op = rng.random()
        if op < 0.3 or not record:  # 1-3 rows join, prompts of 1-12 tokens (a long one often needs a re-layout)
            kv, mask, records = _new_rows(rng, [rng.randint(1, 12) for _ in range(rng.randint(1, 3))])
            before = cache.mask
            cache.add_rows(kv, mask)
            relayouts += cache.mask is not before
            record += records
        elif op < 0.5 and len(record) > 1:  # some rows leave, from anywhere in the batch
            keep = sorted(rng.sample(range(len(record)), rng.randint(1, len(record) - 1)))
            order = cache.keep_rows(keep)
            assert sorted(order) == keep
            record = [record[i] for i in order]
        else:  # a decode step: every row gets one new column in every layer
            before = cache.mask
            cache.next_column()
            relayouts += cache.mask is not before
            column_per_row = [[torch.randn(2, HEADS, DIM) for _ in range(LAYERS)] for _ in record]
            for layer_index, layer in enumerate(cache.layers):
                new = torch.stack([c[layer_index] for c in column_per_row], dim=1)  # [2, rows, heads, dim]
                keys, values = layer.update(new[0][:, :, None], new[1][:, :, None])
                assert keys.shape[2] == cache.end + 1 - cache.start
            cache.advance()
            for columns, column in zip(record, column_per_row, strict=True):
                columns.append(column)
        _check(cache, record)
    assert relayouts >= 3  # the buffers grew (rows and columns) several times on the way


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def built(request):
    model, tokenizer = BUILDERS[request.param]()
    gm = GenerationModel(model, tokenizer.pad_token_id, model.generation_config.decoder_start_token_id)
    return model, tokenizer, gm


PROMPTS = ["why", "the river of", "Alice walk to the market in Paris with a friend and she said that the",
           "東京 🙂", "a", "one two three four five", "Bob and", "market", "in Paris the river",
           "she said that the friend of Alice walks to the old market by the river in the morning"]


def test_sequences_joining_and_leaving_one_by_one_each_equal_generate(built):
    """Ten sequences join one at a time (the long prompts late, into a batch of short rows) and
    leave at different steps, from the middle of the batch: each equals model.generate alone."""
    model, tokenizer, gm = built
    lengths = [3, 14, 6, 9, 2, 11, 5, 8, 4, 7]
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    seqs = [make_seq(gm, ids, [tokenizer.eos_token_id], max_new_tokens=n, min_new_tokens=n)
            for ids, n in zip(prompt_ids, lengths, strict=True)]
    batch, waiting, moved = None, list(seqs), 0

    def leave(batch):  # finished rows leave, as the scheduler does after every step
        nonlocal moved
        keep = [i for i, s in enumerate(batch.seqs) if not s.finish_reason]
        expected = [batch.seqs[i] for i in keep]
        batch = batch.filter(keep)
        if batch is not None:
            moved += sum(a is not b for a, b in zip(batch.seqs, expected, strict=True))
        return batch

    with torch.inference_mode():
        while batch is not None or waiting:
            if waiting:  # one joins every step
                fresh = DecodeBatch.prefill(gm, [waiting.pop(0)])
                batch = fresh if batch is None else batch.concat(fresh)
            batch = leave(batch)  # a row whose first token ended it
            if batch is not None:
                batch.decode(gm)
                batch = leave(batch)
    assert moved  # rows did change places when others left
    for seq, ids, n in zip(seqs, prompt_ids, lengths, strict=True):
        assert seq.generated == reference_generate(model, tokenizer, ids, max_new_tokens=n, min_new_tokens=n,
                                                   do_sample=False)


def test_rows_that_joined_together_decode_without_a_relayout_when_their_tokens_fit(built):
    """Rows prefilled together whose tokens to generate fit in as many columns again as their window
    get exactly those columns: no decode step copies the cache into new buffers (before, a window of
    w columns got max(16, w / 2) more, and 32-row waves of 8-word prompts and 32 tokens were re-laid
    out once each). Each row still equals model.generate alone."""
    model, tokenizer, gm = built
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS[2:4] + PROMPTS[-1:]]
    # The decoder's window: the prompts (decoder-only) or the start token (encoder-decoder).
    new_tokens = 16 if gm.is_encoder_decoder else max(len(ids) for ids in prompt_ids)
    seqs = [make_seq(gm, ids, [tokenizer.eos_token_id], max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            for ids in prompt_ids]
    with torch.inference_mode():
        batch = DecodeBatch.prefill(gm, seqs)
        buffers = [layer.key_buffer for layer in batch.slots.layers]
        for _ in range(new_tokens - 1):
            batch.decode(gm)
            assert all(layer.key_buffer is buffer for layer, buffer in zip(batch.slots.layers, buffers, strict=True))
    for seq, ids in zip(seqs, prompt_ids, strict=True):
        assert seq.generated == reference_generate(model, tokenizer, ids, max_new_tokens=new_tokens,
                                                   min_new_tokens=new_tokens, do_sample=False)
