"""shard_wire: hand-framed ShardChunks are protobuf ShardChunks, and parsing keeps the payload a view."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.comm.shard_inbox import wire_size
from dtrain.comm.shard_wire import (
    GRPC_FRAME_BYTES,
    MalformedChunk,
    WireChunk,
    frame,
    parse,
)
from dtrain.v1 import dtrain_pb2 as pb

HEADER_FIELDS = ("quorum_id", "round", "op", "phase", "shard", "sender", "codec", "numel", "total_bytes", "offset")

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
text = st.text(max_size=40)
headers = st.builds(
    dict,
    quorum_id=u64,
    round=u64,
    op=text,
    phase=u32,
    shard=u32,
    sender=text,
    codec=text,
    numel=u64,
    total_bytes=u64,
    offset=u64,
)


@settings(max_examples=200, deadline=None)
@given(headers, st.binary(max_size=3000))
def test_frame_is_the_protobuf_encoding_and_parse_inverts_it(fields, data):
    raw = frame(pb.ShardChunk(**fields), data)
    assert raw == pb.ShardChunk(data=data, **fields).SerializeToString()  # byte for byte
    got = parse(raw)
    assert isinstance(got.data, memoryview) and bytes(got.data) == data
    for name in HEADER_FIELDS:
        assert getattr(got, name) == fields[name]
    assert got.wire_bytes == len(raw) + GRPC_FRAME_BYTES == wire_size(pb.ShardChunk(data=data, **fields))
    assert wire_size(got) == got.wire_bytes


def test_frame_takes_a_view_of_tensor_memory_and_parse_does_not_copy():
    import torch

    x = torch.arange(1000, dtype=torch.float32)
    view = memoryview(x.numpy()).cast("B")[400:2400]
    raw = frame(pb.ShardChunk(sender="a", offset=400), view)
    got = parse(raw)
    assert bytes(got.data) == x.numpy().tobytes()[400:2400]
    assert got.data.obj is raw  # a view into the received message, not a copy


def _field(num: int, wire: int, body: bytes) -> bytes:
    key = bytes([num << 3 | wire])
    if wire == 2:
        return key + bytes([len(body)]) + body
    return key + body


def test_parse_accepts_any_field_order_and_the_last_data_field_wins():
    raw = (
        _field(11, 2, b"old")
        + _field(6, 2, b"peer-b")
        + _field(4, 0, b"\x02")
        + _field(11, 2, b"new")
        + _field(10, 0, b"\x07")
    )
    got = parse(raw)
    ref = pb.ShardChunk.FromString(raw)
    assert (got.sender, got.phase, got.offset, bytes(got.data)) == (ref.sender, ref.phase, ref.offset, ref.data)
    assert bytes(got.data) == b"new"


def test_unknown_fields_and_fixed_width_fields_are_skipped_like_protobuf_does():
    raw = _field(12, 1, struct.pack("<d", 1.5)) + _field(13, 5, b"\0\0\0\0") + _field(11, 2, b"xy")
    assert bytes(parse(raw).data) == b"xy"


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"\x5a\x10ab", "data field runs past the end"),
        (b"\x00\x01", "field number 0"),
        (b"\x0b", "wire type 3"),
        (b"\x08\x80", "truncated"),
        (b"\x32\x05ab", "field runs past the end"),
        (b"\x32\x02\xff\xfe", "header does not parse"),  # sender (a string) that is not UTF-8
    ],
)
def test_malformed_bytes_raise_malformed_chunk(raw, why):
    with pytest.raises(MalformedChunk, match=why):
        parse(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_parse_or_raise_malformed_chunk_only(raw):
    try:
        got = parse(raw)
    except MalformedChunk:
        return
    assert isinstance(got, WireChunk)
    ref = pb.ShardChunk.FromString(raw)  # what parses here parses for protobuf too, to the same message
    assert bytes(got.data) == ref.data and got.sender == ref.sender and got.offset == ref.offset
