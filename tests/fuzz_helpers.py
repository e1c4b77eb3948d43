"""Hypothesis strategies for the fuzz tier: any protobuf request message, built from its descriptor.

`messages(descriptor, fields=...)` draws messages whose every field may be set to ordinary,
edge or hostile values: empty and unusual text (format braces, control characters, non-BMP),
integers at and past their type's edges, NaN and infinities, unknown enum numbers, several
members of a oneof in turn. `fields` overrides the strategy of a field by name, e.g. to keep
generation lengths small so that each case stays fast.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

# The client errors docs/contracts.md documents for a bad request.
CLIENT_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION})

ODD_TEXT = ["", " ", "{", "}", "{}", "{x}", "{0}", "{1}", "%s", "\x00", "\n\t", "é", "😀", "\ud7ff", "[MASK]",
            "<mask>", "[CLS]", "a" * 300, "positive", "negative", "mean", "cls", "simple", "first", "none",
            "softmax", "sigmoid", "user", "assistant", "system", "base"]
_INT_EDGES = {32: [-2 ** 31, -1, 0, 1, 2, 2 ** 31 - 1], 64: [-2 ** 63, -1, 0, 1, 2 ** 63 - 1]}
_UINT_EDGES = {32: [0, 1, 2 ** 32 - 1], 64: [0, 1, 2 ** 64 - 1]}


def texts(max_size: int = 40):
    return st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=max_size))


def _scalar(field: FieldDescriptor):
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return texts()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=32)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        special = st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, -1.0, math.nan, math.inf, -math.inf])
        return st.one_of(special, st.floats(-1e3, 1e3), st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64))
    if t == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.sampled_from([-1, max(numbers) + 1, 2 ** 31 - 1]))
    bits = 64 if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64,
                       FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64) else 32
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
             FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.integers(0, 64), st.sampled_from(_UINT_EDGES[bits]))
    return st.one_of(st.integers(-3, 64), st.sampled_from(_INT_EDGES[bits]))


def _value(field: FieldDescriptor, fields: dict, depth: int):
    if field.name in fields:
        return fields[field.name]
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, fields, depth + 1)
    return _scalar(field)


@st.composite
def _message(draw, descriptor, fields: dict, depth: int):
    from google.protobuf import message_factory

    message = message_factory.GetMessageClass(descriptor)()
    if depth > 3:
        return message
    oneofs_done: set[str] = set()
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_"):  # a real oneof: at most one member
            if oneof.name in oneofs_done or not draw(st.booleans()):
                continue
            oneofs_done.add(oneof.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name
            key_field, value_field = entry["key"], entry["value"]
            entries = draw(st.dictionaries(_scalar(key_field), _value(value_field, fields, depth), max_size=3))
            target = getattr(message, field.name)
            for key, value in entries.items():
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
            continue
        if field.is_repeated:
            values = draw(st.lists(_value(field, fields, depth), max_size=4))
            target = getattr(message, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for value in values:
                    target.add().CopyFrom(value)
            else:
                target.extend(values)
            continue
        if not draw(st.integers(0, 2)):  # leave it unset a third of the time
            continue
        value = draw(_value(field, fields, depth))
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(value)
        else:
            setattr(message, field.name, value)
    return message


def messages(descriptor, fields: dict | None = None, depth: int = 0):
    """Messages of type `descriptor`; `fields`: field name -> strategy, overriding the default."""
    return _message(descriptor, dict(fields or {}), depth)
