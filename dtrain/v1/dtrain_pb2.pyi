from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("peer_id", "address", "schema_hash", "world_size", "region", "incarnation", "round", "state_hash", "plan", "slice")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    schema_hash: str
    world_size: int
    region: str
    incarnation: str
    round: int
    state_hash: str
    plan: WorkPlan
    slice: str
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., schema_hash: _Optional[str] = ..., world_size: _Optional[int] = ..., region: _Optional[str] = ..., incarnation: _Optional[str] = ..., round: _Optional[int] = ..., state_hash: _Optional[str] = ..., plan: _Optional[_Union[WorkPlan, _Mapping]] = ..., slice: _Optional[str] = ...) -> None: ...

class WorkPlan(_message.Message):
    __slots__ = ("sync_every", "min_steps", "balanced", "tolerance")
    SYNC_EVERY_FIELD_NUMBER: _ClassVar[int]
    MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    BALANCED_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    sync_every: int
    min_steps: int
    balanced: bool
    tolerance: float
    def __init__(self, sync_every: _Optional[int] = ..., min_steps: _Optional[int] = ..., balanced: _Optional[bool] = ..., tolerance: _Optional[float] = ...) -> None: ...

class Donor(_message.Message):
    __slots__ = ("peer_id", "address", "round", "state_hash")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    round: int
    state_hash: str
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., round: _Optional[int] = ..., state_hash: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("lease_timeout_ms", "heartbeat_interval_ms", "committed_round", "committed_state_hash", "must_heal", "donor", "quorum_id", "min_peers")
    LEASE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    MUST_HEAL_FIELD_NUMBER: _ClassVar[int]
    DONOR_FIELD_NUMBER: _ClassVar[int]
    QUORUM_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_PEERS_FIELD_NUMBER: _ClassVar[int]
    lease_timeout_ms: int
    heartbeat_interval_ms: int
    committed_round: int
    committed_state_hash: str
    must_heal: bool
    donor: Donor
    quorum_id: int
    min_peers: int
    def __init__(self, lease_timeout_ms: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., committed_round: _Optional[int] = ..., committed_state_hash: _Optional[str] = ..., must_heal: _Optional[bool] = ..., donor: _Optional[_Union[Donor, _Mapping]] = ..., quorum_id: _Optional[int] = ..., min_peers: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("peer_id", "incarnation")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    incarnation: str
    def __init__(self, peer_id: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("committed_round", "quorum_id", "lease_timeout_ms")
    COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    QUORUM_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    committed_round: int
    quorum_id: int
    lease_timeout_ms: int
    def __init__(self, committed_round: _Optional[int] = ..., quorum_id: _Optional[int] = ..., lease_timeout_ms: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("peer_id", "incarnation", "reason")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    incarnation: str
    reason: str
    def __init__(self, peer_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("peer_id", "incarnation", "round", "state_hash", "wait_ms", "step_rate", "steps", "samples")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    incarnation: str
    round: int
    state_hash: str
    wait_ms: int
    step_rate: float
    steps: int
    samples: int
    def __init__(self, peer_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., round: _Optional[int] = ..., state_hash: _Optional[str] = ..., wait_ms: _Optional[int] = ..., step_rate: _Optional[float] = ..., steps: _Optional[int] = ..., samples: _Optional[int] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("peer_id", "address", "world_size", "region", "steps", "samples", "next_steps", "step_rate", "slice")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_RATE_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    world_size: int
    region: str
    steps: int
    samples: int
    next_steps: int
    step_rate: float
    slice: str
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., world_size: _Optional[int] = ..., region: _Optional[str] = ..., steps: _Optional[int] = ..., samples: _Optional[int] = ..., next_steps: _Optional[int] = ..., step_rate: _Optional[float] = ..., slice: _Optional[str] = ...) -> None: ...

class Quorum(_message.Message):
    __slots__ = ("quorum_id", "round", "members", "state_hash", "commit_timeout_ms", "store_address")
    QUORUM_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    quorum_id: int
    round: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    state_hash: str
    commit_timeout_ms: int
    store_address: str
    def __init__(self, quorum_id: _Optional[int] = ..., round: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., state_hash: _Optional[str] = ..., commit_timeout_ms: _Optional[int] = ..., store_address: _Optional[str] = ...) -> None: ...

class SyncReply(_message.Message):
    __slots__ = ("outcome", "quorum", "donor", "reason", "committed_round", "next_steps")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[SyncReply.Outcome]
        QUORUM: _ClassVar[SyncReply.Outcome]
        HEAL: _ClassVar[SyncReply.Outcome]
        WAIT: _ClassVar[SyncReply.Outcome]
    OUTCOME_UNSPECIFIED: SyncReply.Outcome
    QUORUM: SyncReply.Outcome
    HEAL: SyncReply.Outcome
    WAIT: SyncReply.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    DONOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEPS_FIELD_NUMBER: _ClassVar[int]
    outcome: SyncReply.Outcome
    quorum: Quorum
    donor: Donor
    reason: str
    committed_round: int
    next_steps: int
    def __init__(self, outcome: _Optional[_Union[SyncReply.Outcome, str]] = ..., quorum: _Optional[_Union[Quorum, _Mapping]] = ..., donor: _Optional[_Union[Donor, _Mapping]] = ..., reason: _Optional[str] = ..., committed_round: _Optional[int] = ..., next_steps: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("peer_id", "incarnation", "round", "quorum_id", "ok", "reason", "wait_ms", "contributions")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    QUORUM_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    incarnation: str
    round: int
    quorum_id: int
    ok: bool
    reason: str
    wait_ms: int
    contributions: _containers.RepeatedCompositeFieldContainer[Contribution]
    def __init__(self, peer_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., round: _Optional[int] = ..., quorum_id: _Optional[int] = ..., ok: _Optional[bool] = ..., reason: _Optional[str] = ..., wait_ms: _Optional[int] = ..., contributions: _Optional[_Iterable[_Union[Contribution, _Mapping]]] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("peer_id", "norm", "clip")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    norm: float
    clip: float
    def __init__(self, peer_id: _Optional[str] = ..., norm: _Optional[float] = ..., clip: _Optional[float] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("decision", "round", "quorum_id", "committed_round", "reason")
    class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DECISION_UNSPECIFIED: _ClassVar[CommitReply.Decision]
        COMMIT: _ClassVar[CommitReply.Decision]
        RETRY: _ClassVar[CommitReply.Decision]
        WAIT: _ClassVar[CommitReply.Decision]
    DECISION_UNSPECIFIED: CommitReply.Decision
    COMMIT: CommitReply.Decision
    RETRY: CommitReply.Decision
    WAIT: CommitReply.Decision
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    QUORUM_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    decision: CommitReply.Decision
    round: int
    quorum_id: int
    committed_round: int
    reason: str
    def __init__(self, decision: _Optional[_Union[CommitReply.Decision, str]] = ..., round: _Optional[int] = ..., quorum_id: _Optional[int] = ..., committed_round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("peer_id", "incarnation", "round", "quorum_id", "culprit", "reason", "evidence")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    QUORUM_ID_FIELD_NUMBER: _ClassVar[int]
    CULPRIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    incarnation: str
    round: int
    quorum_id: int
    culprit: str
    reason: str
    evidence: str
    def __init__(self, peer_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., round: _Optional[int] = ..., quorum_id: _Optional[int] = ..., culprit: _Optional[str] = ..., reason: _Optional[str] = ..., evidence: _Optional[str] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ("excluded",)
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    excluded: bool
    def __init__(self, excluded: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberStatus(_message.Message):
    __slots__ = ("peer_id", "address", "region", "world_size", "round", "lease_age_ms", "state", "state_hash", "has_contribution", "contribution_round", "contribution_norm", "clip")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEASE_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    HAS_CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_ROUND_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    region: str
    world_size: int
    round: int
    lease_age_ms: int
    state: str
    state_hash: str
    has_contribution: bool
    contribution_round: int
    contribution_norm: float
    clip: float
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., region: _Optional[str] = ..., world_size: _Optional[int] = ..., round: _Optional[int] = ..., lease_age_ms: _Optional[int] = ..., state: _Optional[str] = ..., state_hash: _Optional[str] = ..., has_contribution: _Optional[bool] = ..., contribution_round: _Optional[int] = ..., contribution_norm: _Optional[float] = ..., clip: _Optional[float] = ...) -> None: ...

class CommitRecord(_message.Message):
    __slots__ = ("round", "quorum_id", "members", "state_hash", "unix_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    QUORUM_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    quorum_id: int
    members: _containers.RepeatedScalarFieldContainer[str]
    state_hash: str
    unix_ms: int
    def __init__(self, round: _Optional[int] = ..., quorum_id: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., state_hash: _Optional[str] = ..., unix_ms: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("committed_round", "quorum_id", "members", "commits", "schema_hash", "min_peers", "phase", "lease_timeout_ms")
    COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    QUORUM_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    MIN_PEERS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    committed_round: int
    quorum_id: int
    members: _containers.RepeatedCompositeFieldContainer[MemberStatus]
    commits: _containers.RepeatedCompositeFieldContainer[CommitRecord]
    schema_hash: str
    min_peers: int
    phase: str
    lease_timeout_ms: int
    def __init__(self, committed_round: _Optional[int] = ..., quorum_id: _Optional[int] = ..., members: _Optional[_Iterable[_Union[MemberStatus, _Mapping]]] = ..., commits: _Optional[_Iterable[_Union[CommitRecord, _Mapping]]] = ..., schema_hash: _Optional[str] = ..., min_peers: _Optional[int] = ..., phase: _Optional[str] = ..., lease_timeout_ms: _Optional[int] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("schema_hash",)
    SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    schema_hash: str
    def __init__(self, schema_hash: _Optional[str] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("peer_id", "round", "state_hash")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round: int
    state_hash: str
    def __init__(self, peer_id: _Optional[str] = ..., round: _Optional[int] = ..., state_hash: _Optional[str] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("schema_hash", "requester", "min_round")
    SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    MIN_ROUND_FIELD_NUMBER: _ClassVar[int]
    schema_hash: str
    requester: str
    min_round: int
    def __init__(self, schema_hash: _Optional[str] = ..., requester: _Optional[str] = ..., min_round: _Optional[int] = ...) -> None: ...

class TensorMeta(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("transfer_id", "round", "state_hash", "total_bytes", "tensors", "chunk_bytes", "meta_json")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    round: int
    state_hash: str
    total_bytes: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    chunk_bytes: int
    meta_json: str
    def __init__(self, transfer_id: _Optional[str] = ..., round: _Optional[int] = ..., state_hash: _Optional[str] = ..., total_bytes: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., chunk_bytes: _Optional[int] = ..., meta_json: _Optional[str] = ...) -> None: ...

class StateChunkRequest(_message.Message):
    __slots__ = ("transfer_id", "offset", "length")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    offset: int
    length: int
    def __init__(self, transfer_id: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("quorum_id", "round", "op", "phase", "shard", "sender", "codec", "numel", "total_bytes", "offset", "data")
    QUORUM_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    quorum_id: int
    round: int
    op: str
    phase: int
    shard: int
    sender: str
    codec: str
    numel: int
    total_bytes: int
    offset: int
    data: bytes
    def __init__(self, quorum_id: _Optional[int] = ..., round: _Optional[int] = ..., op: _Optional[str] = ..., phase: _Optional[int] = ..., shard: _Optional[int] = ..., sender: _Optional[str] = ..., codec: _Optional[str] = ..., numel: _Optional[int] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...
