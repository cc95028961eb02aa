"""The wire layer: what crosses a process boundary, with no network I/O of its own.

The codec interface, the state snapshot (payload, blobs, state hash), the
schema hash, token / TLS / channel helpers, the round-outcome vocabulary and
its mapping onto the proto enums, and varints. The generated gRPC code lives
beside it in ``dtrain.v1``.
"""
