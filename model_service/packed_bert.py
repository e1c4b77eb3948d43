"""A padding-free forward pass for BERT encoders (BERT, MiniLM and other `BertModel` bodies).

A batch of rows of different lengths, padded to the longest, spends most of its forward pass on the
padding: every linear layer, LayerNorm and activation runs on every position. Here the rows' real tokens
are packed into one [tokens, hidden] matrix and every per-token step (embeddings with each row's own
position ids, the Q/K/V and output projections, the feed-forward, the LayerNorms) runs on it alone;
only the attention itself, which mixes tokens within a row, runs on padded [rows, heads, length, head
size] tensors (rows cut into groups of similar length, so its padding stays small), with the padded
keys masked. The task head runs on what it reads: the first token of each row (pooler and sequence
classification) or every token (token classification, question answering, the encoder's
`last_hidden_state`, padded back to [rows, length, hidden] with zeros at padded positions).

The weights are the model's own modules, called as the model calls them; answers equal the padded
forward within float noise (tests/test_packed_forward.py). `packed_forward(model)` returns None for a
model it does not cover (another architecture, a decoder, cross-attention, a head not listed in
`_HEADS`), and the backend then runs the model's own padded forward.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from model_service import matmuls

# Padded attention tokens a group of rows may waste before it is cut in two (per row: rows x longest
# minus the rows' own lengths); each group is one more set of attention calls per layer.
ATTENTION_WASTE_TOKENS = 256


def _trunk_supported(bert) -> bool:
    config = bert.config
    if type(bert).__name__ != "BertModel" or config.is_decoder or getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return False
    return all(type(layer).__name__ == "BertLayer" and type(layer.attention.self).__name__ == "BertSelfAttention"
               for layer in bert.encoder.layer)


def _first_tokens(hidden: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    return hidden.index_select(0, starts)


def _pooled(bert, hidden, starts):
    return bert.pooler.activation(bert.pooler.dense(_first_tokens(hidden, starts)))


def _head_model(model, bert, hidden, starts, unpack):
    out = {"last_hidden_state": unpack(hidden)}
    if bert.pooler is not None:
        out["pooler_output"] = _pooled(bert, hidden, starts)
    return out


def _head_sequence_classification(model, bert, hidden, starts, unpack):
    return {"logits": model.classifier(model.dropout(_pooled(bert, hidden, starts)))}


def _head_token_classification(model, bert, hidden, starts, unpack):
    return {"logits": unpack(model.classifier(model.dropout(hidden)))}


def _head_question_answering(model, bert, hidden, starts, unpack):
    start, end = unpack(model.qa_outputs(hidden)).split(1, dim=-1)
    return {"start_logits": start.squeeze(-1).contiguous(), "end_logits": end.squeeze(-1).contiguous()}


def _head_masked_lm(model, bert, hidden, starts, unpack):
    return {"logits": unpack(model.cls(hidden))}


# Model class -> (does it need the pooler, the head on the packed last hidden state).
_HEADS = {
    "BertForMaskedLM": (False, _head_masked_lm),
    "BertModel": (False, _head_model),
    "BertForSequenceClassification": (True, _head_sequence_classification),
    "BertForTokenClassification": (False, _head_token_classification),
    "BertForQuestionAnswering": (False, _head_question_answering),
}


def attention_groups(lengths: list[int], waste_tokens: int = ATTENTION_WASTE_TOKENS) -> list[tuple[int, int]]:
    """Cut rows (in batch order) into runs [start, end) whose attention is padded to the run's longest row,
    starting a new run when the padding it would add passes `waste_tokens`. Rows the batcher sorted by
    length make few runs; unsorted rows still work, with more padding or more runs."""
    groups, start, longest, total = [], 0, 0, 0
    for i, n in enumerate(lengths):
        grown_longest = max(longest, n)
        if i > start and grown_longest * (i + 1 - start) - (total + n) > waste_tokens:
            groups.append((start, i))
            start, longest, total = i, n, n
        else:
            longest, total = grown_longest, total + n
    groups.append((start, len(lengths)))
    return groups


class _Packing:
    """Where each row's tokens sit in the packed matrix, and the index maps to and from padded groups."""

    def __init__(self, mask: torch.Tensor):
        rows, length = mask.shape
        self.rows, self.length = rows, length
        flat = mask.reshape(-1).bool()
        self.index = flat.nonzero().squeeze(1)             # packed token -> position in [rows x length]
        lengths = mask.sum(dim=1)
        self.lengths = lengths.tolist()
        self.starts = torch.cumsum(lengths, 0) - lengths   # packed index of each row's first token
        self.positions = torch.arange(length, device=mask.device).repeat(rows)[self.index]
        # Per attention group: (its first packed token, its token count, rows, padded length,
        # packed token -> position in [rows x padded length], key mask [rows, 1, 1, padded length]).
        self.groups = []
        for start, end in attention_groups(self.lengths):
            group_length = max(self.lengths[start:end])
            first = int(self.starts[start])
            count = sum(self.lengths[start:end])
            within = (self.index[first:first + count] - start * length)
            within = (within // length) * group_length + within % length
            key_mask = mask[start:end, :group_length].bool().view(end - start, 1, 1, group_length)
            self.groups.append((first, count, end - start, group_length, within, key_mask))

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[tokens, ...] -> [rows, length, ...], zeros at padded positions."""
        full = packed.new_zeros((self.rows * self.length, *packed.shape[1:]))
        full.index_copy_(0, self.index, packed)
        return full.view(self.rows, self.length, *packed.shape[1:])


def _padded_heads(packed: torch.Tensor, within: torch.Tensor, rows: int, length: int, heads: int, size: int):
    """A group's packed [tokens, heads x size] -> [rows, heads, length, size], zeros at padded positions."""
    full = packed.new_zeros((rows * length, packed.shape[1]))
    full.index_copy_(0, within, packed)
    return full.view(rows, length, heads, size).transpose(1, 2)


ONEDNN = matmuls.available()
_PLAIN_LINEAR = (torch.nn.Linear, matmuls.OneDnnLinear)  # generation's routing subclass: the same layer


def _dense(linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)`, on oneDNN for a plain fp32 CPU nn.Linear: torch's own linear calls MKL's sgemm, which
    takes its AVX2 path on AMD CPUs, where oneDNN uses AVX-512 (about 2x the GFLOP/s on this project's
    EPYC, one thread, MiniLM's shapes; model_service/matmuls.py measured the same for GPT-2).
    Same fp32 precision, sums in another order (the last bits differ, as between batch sizes). Anything
    else (LoRA-wrapped layers, other dtypes or devices) runs the module itself."""
    weight = getattr(linear, "weight", None)
    if (ONEDNN and type(linear) in _PLAIN_LINEAR and weight.dtype == torch.float32 and x.dtype == torch.float32
            and weight.device.type == "cpu" and type(weight) is torch.nn.Parameter):
        return matmuls.linear(x, weight, linear.bias)
    return linear(x)


def _attention(self_attention, hidden: torch.Tensor, packing: _Packing) -> torch.Tensor:
    heads, size = self_attention.num_attention_heads, self_attention.attention_head_size
    query, key, value = (_dense(self_attention.query, hidden), _dense(self_attention.key, hidden),
                         _dense(self_attention.value, hidden))
    out = torch.empty_like(query)
    for first, count, rows, length, within, key_mask in packing.groups:
        padded = [_padded_heads(t[first:first + count], within, rows, length, heads, size) for t in (query, key, value)]
        context = functional.scaled_dot_product_attention(*padded, attn_mask=key_mask, scale=self_attention.scaling)
        out[first:first + count] = context.transpose(1, 2).reshape(rows * length, heads * size)[within]
    return out


def _encode(bert, inputs: dict, packing: _Packing) -> torch.Tensor:
    ids = inputs["input_ids"].reshape(-1)[packing.index].unsqueeze(0)
    types = inputs.get("token_type_ids")
    types = None if types is None else types.reshape(-1)[packing.index].unsqueeze(0)
    hidden = bert.embeddings(input_ids=ids, token_type_ids=types, position_ids=packing.positions.unsqueeze(0))[0]
    for layer in bert.encoder.layer:  # BertLayer's own steps (dropout: none at inference)
        attention_out = layer.attention.output
        context = _attention(layer.attention.self, hidden, packing)
        attended = attention_out.LayerNorm(_dense(attention_out.dense, context) + hidden)
        intermediate = layer.intermediate.intermediate_act_fn(_dense(layer.intermediate.dense, attended))
        hidden = layer.output.LayerNorm(_dense(layer.output.dense, intermediate) + attended)
    return hidden


def packed_forward(model):
    """A padding-free forward for `model`, or None when this module does not cover it:
    forward(inputs, hidden_states) -> {output name: tensor}, the outputs the model's own forward returns."""
    class_name = type(model).__name__
    if class_name not in _HEADS:
        return None
    bert = model if class_name == "BertModel" else getattr(model, "bert", None)
    if bert is None or not _trunk_supported(bert):
        return None
    needs_pooler, head = _HEADS[class_name]
    if needs_pooler and bert.pooler is None:
        return None

    def forward(inputs: dict, hidden_states: bool = False) -> dict | None:
        if (model.training or set(inputs) - {"input_ids", "attention_mask", "token_type_ids"}
                or inputs["input_ids"].ndim != 2):
            return None
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        packing = _Packing(torch.ones_like(ids) if mask is None else mask)
        hidden = _encode(bert, inputs, packing)
        out = head(model, bert, hidden, packing.starts, packing.unpack)
        if hidden_states and "last_hidden_state" not in out:
            out["last_hidden_state"] = packing.unpack(hidden)
        return out

    return forward
