"""The running batch of a continuous-batching generator, as plain data operations.

A DecodeBatch holds every active sequence in one transformers KV cache (the decoder's keys and
values in a SlotCache, slots.py; T5/BART-style models add a DynamicCache of cross-attention
keys and values in an EncoderDecoderCache) plus the tensors a decode step needs. Rows are
left-padded in the decoder so every row's newest token sits in the last column; the attention
mask hides the padding and position ids count only real tokens, so each row sees exactly what
it would see alone. Encoder states (cross-attention) are right-padded and masked the same way.

- `prefill(model, seqs)` builds a batch from new sequences (one forward pass) and picks
  their first token;
- `concat(other)` merges two batches (copies the other's rows into this batch's buffers);
- `filter(keep)` drops rows (finished or cancelled; rows may change places) and trims padding
  no row needs;
- `decode(model)` advances every row one token in one forward pass, writing only the new
  column of the cache.
All of it runs on an engine worker thread (one step at a time).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache, EncoderDecoderCache

from model_service.generation.sampling import SamplingParams, TokenChooser, choose_tokens
from model_service.generation.slots import SlotCache
from model_service.generation.whisper import SpeechModel


@dataclass(eq=False)
class Sequence:
    """One generation request: its prompt, settings and what it has produced so far."""

    request_id: str
    prompt_ids: list
    params: SamplingParams
    adapter: str = ""
    generated: list = field(default_factory=list)
    finish_reason: str = ""   # "" while running, else length | eos | stop
    cancelled: bool = False
    chooser: TokenChooser | None = None
    seen: torch.Tensor | None = None  # ids the repetition penalty looks at
    last_logprob: float | None = None
    # Speech models (Whisper): the encoder input and the request's logits rules; prompt_ids is then
    # the decoder prompt (generation/whisper.py).
    encoder_features: torch.Tensor | None = None
    speech: object = None
    # Filled in by the scheduler (event-loop side).
    events: object = None
    submitted_at: float = 0.0
    first_token_at: float = 0.0

    @property
    def reserved_tokens(self) -> int:
        """Positions this sequence may occupy at most (its share of the tokens-in-flight limit)."""
        return len(self.prompt_ids) + self.params.max_new_tokens


class GenerationModel:
    """How to run prefill and decode on one transformers model (decoder-only or encoder-decoder)."""

    def __init__(self, model, pad_token_id: int, decoder_start_token_id: int | None):
        self.model = model
        self.device = next(model.parameters()).device
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.pad_token_id = int(pad_token_id or 0)
        self.decoder_start_token_id = decoder_start_token_id
        self.speech = SpeechModel.of(model)  # None unless Whisper
        if self.is_encoder_decoder and decoder_start_token_id is None:
            raise ValueError("encoder-decoder model without decoder_start_token_id")
        params = inspect.signature(model.forward).parameters
        self.takes_position_ids = "position_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params
        # The KV cache argument and output: `cache` from transformers 5.x on (`past_key_values` is
        # deprecated there), `past_key_values` before.
        self.cache_name = "cache" if "cache" in params else "past_key_values"

    def forward(self, cache: Cache, **inputs) -> tuple[torch.Tensor, Cache, object]:
        """One forward pass that extends `cache`: (logits, the cache, the model's whole output)."""
        if self.takes_logits_to_keep and not self.is_encoder_decoder:
            inputs["logits_to_keep"] = 1
        out = self.model(**inputs, **{self.cache_name: cache}, use_cache=True, return_dict=True)
        return out.logits, out[self.cache_name], out


def _self_layers(cache):
    return cache.self_attention_cache.layers if hasattr(cache, "self_attention_cache") else cache.layers


def _cross_layers(cache):
    return cache.cross_attention_cache.layers if hasattr(cache, "cross_attention_cache") else []


def _room(seqs) -> int:
    """Cache columns the rows may still need: one per token each may still feed (its last is never fed)."""
    return max(s.params.max_new_tokens - len(s.generated) for s in seqs)


def _pad_seq(t: torch.Tensor, dim: int, left: int = 0, right: int = 0) -> torch.Tensor:
    """Zero-pad tensor `t` along `dim` (negative dims count from the end)."""
    if not left and not right:
        return t
    pads = [0, 0] * (t.dim() - (dim % t.dim()) - 1) + [left, right]
    return F.pad(t, pads)


class DecodeBatch:
    def __init__(self, seqs, cache, attention_mask, next_tokens, positions, encoder_hidden=None,
                 encoder_mask=None):
        """`cache`: a prefill's transformers cache and `attention_mask` [B, L] its decoder mask
        (left-padded); the decoder's keys and values move into a SlotCache."""
        self.seqs = list(seqs)
        self.slots = SlotCache(len(_self_layers(cache)))
        self.slots.add_rows([(layer.keys, layer.values) for layer in _self_layers(cache)], attention_mask,
                            _room(self.seqs))
        # transformers Cache, rows = seqs
        self.cache = EncoderDecoderCache(self.slots, cache.cross_attention_cache) \
            if hasattr(cache, "cross_attention_cache") else self.slots
        self.next_tokens = next_tokens        # [B] chosen but not yet fed
        self.positions = positions            # [B] position id of next_tokens (decoder-only)
        self.encoder_hidden = encoder_hidden  # [B, S, E] right-padded (encoder-decoder)
        self.encoder_mask = encoder_mask      # [B, S]

    def __len__(self):
        return len(self.seqs)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, L] decoder self-attention mask, left-padded."""
        return self.slots.attention_mask

    @property
    def padded_length(self) -> int:
        return int(self.attention_mask.shape[1])

    # ------------------------------------------------------------------ building

    @classmethod
    def prefill(cls, gm: GenerationModel, seqs) -> DecodeBatch:
        """One forward pass over the new sequences' prompts; their first tokens are chosen."""
        if gm.speech is not None:
            return cls._prefill_speech(gm, seqs)
        dev = gm.device
        lengths = [len(s.prompt_ids) for s in seqs]
        width = max(lengths)
        ids = torch.full((len(seqs), width), gm.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            n = lengths[row]
            if gm.is_encoder_decoder:  # encoder input: right padding
                ids[row, :n] = torch.tensor(seq.prompt_ids)
                mask[row, :n] = 1
            else:  # decoder input: left padding
                ids[row, width - n:] = torch.tensor(seq.prompt_ids)
                mask[row, width - n:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        if gm.is_encoder_decoder:
            start = torch.full((len(seqs), 1), gm.decoder_start_token_id, dtype=torch.long, device=dev)
            logits, cache, out = gm.forward(EncoderDecoderCache(DynamicCache(), DynamicCache()), input_ids=ids,
                                            attention_mask=mask, decoder_input_ids=start)
            batch = cls(seqs, cache, torch.ones_like(start), None,
                        torch.ones(len(seqs), dtype=torch.long, device=dev),
                        out.encoder_last_hidden_state, mask)
            for seq in seqs:
                seq.seen = torch.tensor([gm.decoder_start_token_id], dtype=torch.long, device=dev)
        else:
            # A plain DynamicCache (full-length layers) whatever the config says: rows are padded,
            # merged and trimmed by the operations below; masks still follow the model's config.
            inputs = {"input_ids": ids, "attention_mask": mask}
            if gm.takes_position_ids:
                inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            logits, cache, _ = gm.forward(DynamicCache(), **inputs)
            batch = cls(seqs, cache, mask, None, torch.tensor(lengths, dtype=torch.long, device=dev))
            for seq in seqs:
                seq.seen = torch.tensor(seq.prompt_ids, dtype=torch.long, device=dev)
        batch._choose(logits[:, -1, :])
        return batch

    @classmethod
    def _prefill_speech(cls, gm: GenerationModel, seqs) -> DecodeBatch:
        """Whisper: the encoder over the rows' features, the language where it is to be detected, then
        the decoder over the prompts, left-padded (position ids count real tokens only)."""
        from transformers.modeling_outputs import BaseModelOutput

        dev = gm.device
        features = torch.cat([s.encoder_features for s in seqs]).to(dev, dtype=gm.model.dtype)
        hidden = gm.model.get_encoder()(features).last_hidden_state
        gm.speech.fill_language(gm.model, seqs, hidden)
        lengths = [len(s.prompt_ids) for s in seqs]
        width = max(lengths)
        ids = torch.full((len(seqs), width), gm.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - lengths[row]:] = torch.tensor(seq.prompt_ids)
            mask[row, width - lengths[row]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache, _ = gm.forward(EncoderDecoderCache(DynamicCache(), DynamicCache()),
                                      encoder_outputs=BaseModelOutput(last_hidden_state=hidden), decoder_input_ids=ids,
                                      decoder_attention_mask=mask, decoder_position_ids=positions)
        encoder_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=dev)
        batch = cls(seqs, cache, mask, None, torch.tensor(lengths, dtype=torch.long, device=dev), hidden, encoder_mask)
        for seq in seqs:
            seq.seen = torch.tensor(seq.prompt_ids, dtype=torch.long, device=dev)
        batch._choose(logits[:, -1, :])
        return batch

    def concat(self, other: DecodeBatch) -> DecodeBatch:
        """Append `other`'s rows to this batch (in place); cross-attention caches are padded."""
        self.slots.add_rows([(layer.keys, layer.values) for layer in other.slots.layers], other.attention_mask,
                            _room(self.seqs + other.seqs))
        if self.encoder_hidden is not None:
            s_a, s_b = self.encoder_mask.shape[1], other.encoder_mask.shape[1]
            width = max(s_a, s_b)
            for a, b in zip(_cross_layers(self.cache), _cross_layers(other.cache), strict=True):
                a.keys = torch.cat([_pad_seq(a.keys, -2, right=width - s_a), _pad_seq(b.keys, -2, right=width - s_b)])
                a.values = torch.cat([_pad_seq(a.values, -2, right=width - s_a),
                                      _pad_seq(b.values, -2, right=width - s_b)])
            self.encoder_hidden = torch.cat([_pad_seq(self.encoder_hidden, 1, right=width - s_a),
                                             _pad_seq(other.encoder_hidden, 1, right=width - s_b)])
            self.encoder_mask = torch.cat([_pad_seq(self.encoder_mask, 1, right=width - s_a),
                                           _pad_seq(other.encoder_mask, 1, right=width - s_b)])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.positions = torch.cat([self.positions, other.positions])
        self.seqs += other.seqs
        return self

    def filter(self, keep: list[int]) -> DecodeBatch | None:
        """Keep only rows `keep` (in place; the rows left may change places); None when no row is left."""
        if not keep:
            return None
        if len(keep) == len(self.seqs):
            return self
        order = self.slots.keep_rows(keep)
        idx = torch.tensor(order, dtype=torch.long, device=self.attention_mask.device)
        if self.encoder_hidden is not None:
            enc_mask = self.encoder_mask.index_select(0, idx)
            end = int((enc_mask.sum(0) > 0).nonzero()[-1]) + 1  # right columns that only padding uses
            for layer in _cross_layers(self.cache):
                layer.keys = layer.keys.index_select(0, idx)[..., :end, :]
                layer.values = layer.values.index_select(0, idx)[..., :end, :]
            self.encoder_hidden = self.encoder_hidden.index_select(0, idx)[:, :end]
            self.encoder_mask = enc_mask[:, :end]
        self.next_tokens = self.next_tokens.index_select(0, idx)
        self.positions = self.positions.index_select(0, idx)
        self.seqs = [self.seqs[i] for i in order]
        return self

    # ------------------------------------------------------------------ stepping

    def decode(self, gm: GenerationModel) -> None:
        """Feed every row's pending token (one forward pass) and choose the next ones."""
        mask = self.slots.next_column(_room(self.seqs))
        tokens = self.next_tokens[:, None]
        if gm.is_encoder_decoder:
            from transformers.modeling_outputs import BaseModelOutput

            extra = {"decoder_position_ids": self.positions[:, None]} if gm.speech is not None else {}
            logits, _, _ = gm.forward(
                self.cache, encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_hidden),
                attention_mask=self.encoder_mask, decoder_input_ids=tokens, decoder_attention_mask=mask, **extra)
        else:
            inputs = {"input_ids": tokens, "attention_mask": mask}
            if gm.takes_position_ids:
                inputs["position_ids"] = self.positions[:, None]
            logits, _, _ = gm.forward(self.cache, **inputs)
        self.slots.advance()
        self.positions = self.positions + 1
        for seq, token in zip(self.seqs, self.next_tokens.tolist(), strict=True):
            if seq.params.repetition_penalty != 1.0:
                seq.seen = torch.cat([seq.seen, seq.seen.new_tensor([token])])
        self._choose(logits[:, -1, :])

    def _choose(self, logits: torch.Tensor) -> None:
        """Pick each row's next token, record it and decide whether the row is finished."""
        choices = choose_tokens(logits, [s.chooser for s in self.seqs], [s.seen for s in self.seqs],
                                [len(s.generated) for s in self.seqs],
                                [s.speech and (lambda row, s=s: s.speech.process(row, s.generated)) for s in self.seqs])
        for seq, (token, logprob) in zip(self.seqs, choices, strict=True):
            seq.generated.append(token)
            seq.last_logprob = logprob
            p = seq.params
            if token in p.eos_token_ids:
                seq.finish_reason = "eos"
            elif token in p.stop_token_ids:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= p.max_new_tokens:
                seq.finish_reason = "length"
        self.next_tokens = torch.tensor([s.generated[-1] for s in self.seqs], dtype=torch.long,
                                        device=self.attention_mask.device)
