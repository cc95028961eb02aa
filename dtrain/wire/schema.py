"""Schema hash: who may talk to whom.

    schema_hash = sha256( sha256(serialized FileDescriptorProto of dtrain.v1)
                          || canonical JSON of the model / space config )

A peer built from other proto files or configured with another model gets
another hash, and the coordinator and the other peers refuse it at the door
(FAILED_PRECONDITION).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional

from ..v1 import dtrain_pb2


def proto_digest() -> str:
    return hashlib.sha256(dtrain_pb2.DESCRIPTOR.serialized_pb).hexdigest()


def schema_hash(model_config: Optional[Any] = None) -> str:
    """Hash of the wire contract and the model config (a dict or a dataclass)."""
    if dataclasses.is_dataclass(model_config):
        if isinstance(model_config, type):  # as dataclasses.asdict itself would refuse it
            raise TypeError(f"schema_hash takes a dataclass instance, not the class {model_config.__name__}")
        model_config = dataclasses.asdict(model_config)
    blob = json.dumps(model_config, sort_keys=True, separators=(",", ":"), default=str)
    h = hashlib.sha256()
    h.update(proto_digest().encode())
    h.update(b"\x00")
    h.update(blob.encode())
    return h.hexdigest()
