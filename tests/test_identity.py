"""Per-peer identity: a call that names a peer id must come from that peer's own identity.

Two ways to hold one: a client certificate from ``dtrain-certs`` under mutual TLS
(the id in its URI SAN ``dtrain-peer:<id>``), or an identity token derived from
the cluster secret (no TLS needed). For every RPC of the Coordinator and of the
Peer service, a genuine member presenting another member's id is refused
(PERMISSION_DENIED, one log line naming both) and nothing is applied, while
the genuine identity works; tools (``dtrain-status``) may call Status only; a
revoked peer is refused and removed (at start and on SIGHUP); the shared-token
mode still works; the launch scripts pick a peer's own files by its id; a
model-free run whose peers hold per-peer tokens trains, heals and refuses an
impostor.

Coordinators are child processes on 127.0.0.1:0 started by the ``coordinators``
fixture of ``test_control_security`` (it stops exactly the processes it
started); Peer services are in-process servers stopped at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import grpc
import pytest
import test_control_security as security
import torch
from cryptography import x509

from dtrain.comm.collective import Group
from dtrain.comm.grpc_allreduce import GrpcCollective
from dtrain.comm.peer_service import PeerServicer, serve_peer
from dtrain.comm.shard_inbox import ShardInbox
from dtrain.comm.state_download import StateTransferError, fetch_state
from dtrain.config import TLSConfig
from dtrain.control import certs
from dtrain.control.client import CoordinatorClient, NotAuthenticated, NotMember, QuorumView
from dtrain.errors import ConfigError
from dtrain.outer.codecs import FP32Codec
from dtrain.v1 import dtrain_pb2 as pb
from dtrain.v1 import dtrain_pb2_grpc as pb_grpc
from dtrain.wire import auth
from dtrain.wire.auth import PEER, TOOL, IdentityGuard, TokenPolicy, mint_token
from dtrain.wire.outcomes import CommitDecision
from dtrain.wire.snapshot import MAX_MESSAGE_BYTES, StateSnapshot

from conftest import stop_servers
from control_fixtures import check_parity
from proc_fixtures import read_jsonl

coordinators = security.coordinators  # the fixture: coordinator processes, each stopped at teardown
SCHEMA, Code, _cli, _cli_all, _md = security.SCHEMA, security.Code, security._cli, security._cli_all, security._md
SECRET = "the-cluster-secret-of-these-tests"
OTHER_SECRET = "another-cluster-secret"
H0 = "h0-0123456789abcdef"
ALL3 = ("alice", "bob", "carol")
MODES = ("mtls", "token")
RPCS = ("Join", "Heartbeat", "Sync", "Commit", "Report", "Leave")


# ---------------------------------------------------------------- identities


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    """A CA, the coordinator's certificate, peers alice / bob / carol (certificates that also serve TLS for
    localhost, and tokens), the tool ``status``, and ``legacy``: a certificate of the same CA without a dtrain
    identity (as dtrain-certs wrote them before)."""
    d = tmp_path_factory.mktemp("ids")
    files = certs.generate(
        str(d),
        clients=["alice", "bob", "carol"],
        tools=["status"],
        peer_hosts=["localhost", "127.0.0.1"],
        secret=SECRET,
    )
    from cryptography.hazmat.primitives import serialization

    ca_key = serialization.load_pem_private_key(Path(files.ca_key).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(Path(files.ca_cert).read_bytes())
    key, cert = certs.issue(ca_key, ca_cert, "bob", client=True)  # CN bob, but no dtrain-peer URI SAN
    (d / "legacy.pem").write_bytes(certs.cert_pem(cert))
    (d / "legacy.key").write_bytes(certs.key_pem(key))
    files.clients["legacy"] = (str(d / "legacy.pem"), str(d / "legacy.key"))
    return files


def creds(files, mode: str, name: str) -> Tuple[Optional[TLSConfig], str]:
    """(client TLS, token) for ``name`` (a peer, ``status``, ``legacy``) in ``mode``."""
    if mode == "mtls":
        cert, key = files.clients[name] if name in files.clients else files.tools[name]
        return TLSConfig(ca=files.ca_cert, cert=cert, key=key), ""
    return None, Path(files.tokens[name]).read_text().strip()


def coordinator_args(files, mode: str, *extra: str) -> Tuple[str, ...]:
    if mode == "mtls":
        return (
            f"tls.cert={files.server_cert}",
            f"tls.key={files.server_key}",
            f"tls.client_ca={files.ca_cert}",
        ) + extra
    return (f"auth.secret={SECRET}",) + extra


def stub_for(address: str, tls: Optional[TLSConfig]) -> Tuple[grpc.Channel, pb_grpc.CoordinatorStub]:
    ch = auth.make_channel(address, tls, 8 * 2**20)
    return ch, pb_grpc.CoordinatorStub(ch)


def call(stub, method: str, request, token: str) -> Tuple[Code, str]:
    try:
        getattr(stub, method)(request, metadata=_md(token) if token else (), timeout=5)
        return Code.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def requests_as(claimed: str, incarnation: str, quorum_id: int = 1, culprit: str = "alice") -> Dict[str, object]:
    """One request of every peer RPC of the Coordinator, naming ``claimed`` (with its real incarnation): each
    would hurt the real peer if it were applied (a new address, a lease renewed, a not-ok vote, an exclusion
    of another member, a leave)."""
    return {
        "Join": pb.JoinRequest(
            peer_id=claimed, address="127.0.0.1:7666", schema_hash=SCHEMA, world_size=1, incarnation=incarnation
        ),
        "Heartbeat": pb.HeartbeatRequest(peer_id=claimed, incarnation=incarnation),
        "Sync": pb.SyncRequest(peer_id=claimed, incarnation=incarnation, round=0, state_hash=H0, wait_ms=0),
        "Commit": pb.CommitRequest(
            peer_id=claimed, incarnation=incarnation, round=0, quorum_id=quorum_id, ok=False, reason="x", wait_ms=0
        ),
        "Report": pb.ReportRequest(
            peer_id=claimed, incarnation=incarnation, round=0, quorum_id=quorum_id, culprit=culprit, reason="garbage"
        ),
        "Leave": pb.LeaveRequest(peer_id=claimed, incarnation=incarnation, reason="impostor"),
    }


def client(address: str, files, mode: str, name: str, port: int, peer_id: Optional[str] = None) -> CoordinatorClient:
    tls, token = creds(files, mode, name)
    return CoordinatorClient(
        address, peer_id or name, f"127.0.0.1:{port}", SCHEMA, token=token, tls=tls, rpc_timeout=5.0
    )


def log_lines(text: str, needle: str) -> List[str]:
    return [ln for ln in text.splitlines() if needle in ln]


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------- tokens and the guard, without servers


@pytest.mark.timeout(30)
def test_identity_tokens():
    alice = mint_token(SECRET, PEER, "alice")
    assert alice.startswith("dtrain-peer:alice:") and alice == mint_token(SECRET, PEER, "alice")  # deterministic
    assert auth.is_identity_token(alice) and not auth.is_identity_token("s3cret")
    policy = TokenPolicy.for_server(secret=SECRET)
    assert policy.mode == TokenPolicy.IDENTITY and policy.key == auth.cluster_key(SECRET)
    assert policy.identity_of(alice) == auth.Identity(PEER, "alice", "token")
    assert policy.identity_of(mint_token(SECRET, TOOL, "status")) == auth.Identity(TOOL, "status", "token")
    # a peer's Peer service pins the key its own token names: it checks others' tokens without the secret
    assert TokenPolicy.for_server(token=mint_token(SECRET, PEER, "bob")).key == policy.key
    subject, key, sig = alice.rsplit(":", 2)
    forged_sig = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    other = mint_token(OTHER_SECRET, PEER, "alice")
    refused = {
        "": "no token",
        "s3cret": "a token that is no identity token",
        other: "of another cluster secret",
        f"{subject}:{key}:{forged_sig}": "whose signature does not verify",
        f"dtrain-peer:bob:{key}:{sig}": "whose signature does not verify",  # alice's signature, bob's name
        f"dtrain-peer:b@d:{key}:{sig}": "no identity token",
    }
    for token, why in refused.items():
        assert policy.identity_of(token) is None, token
        assert why in policy.describe(token), (token, policy.describe(token))
        assert SECRET not in policy.describe(token) and sig not in policy.describe(token)
    with pytest.raises(ConfigError, match="does not verify"):
        TokenPolicy.for_server(token=f"{subject}:{key}:{forged_sig}")
    assert TokenPolicy.for_server(token="s3cret").mode == TokenPolicy.SHARED
    assert TokenPolicy.for_server().mode == TokenPolicy.NONE
    for bad in ("", "a:b", "x" * 129):
        with pytest.raises(ValueError):
            mint_token(SECRET, PEER, bad)


class FakeContext:
    def __init__(self, token: str = "", auth_context: Optional[dict] = None):
        self.md = (("authorization", f"Bearer {token}"),) if token else ()
        self.ac = auth_context or {}

    def invocation_metadata(self):
        return self.md

    def auth_context(self):
        return self.ac


def _cert_ctx(uris=(), cn: str = "x", token: str = "") -> FakeContext:
    ac = {"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----"], "x509_common_name": [cn.encode()]}
    if uris:
        ac["peer_uri"] = [u.encode() for u in uris]
    return FakeContext(token, ac)


@pytest.mark.timeout(30)
def test_guard_rules(caplog):
    caplog.set_level("WARNING", logger="dtrain.control")
    tokens = IdentityGuard(TokenPolicy.for_server(secret=SECRET), revoked=["dave"])
    alice, tool = mint_token(SECRET, PEER, "alice"), mint_token(SECRET, TOOL, "status")
    assert tokens.binding
    assert tokens.authorize(FakeContext(alice), "Join", "alice") == (auth.Identity(PEER, "alice", "token"), "")
    ident, why = tokens.authorize(FakeContext(alice), "Join", "bob")
    assert ident == auth.Identity(PEER, "alice", "token") and "may not act as peer 'bob'" in why
    assert "Status only" in tokens.authorize(FakeContext(tool), "Sync", "bob")[1]
    assert tokens.authorize(FakeContext(tool), "Status", None)[1] == ""
    assert "revoked" in tokens.authorize(FakeContext(mint_token(SECRET, PEER, "dave")), "Status", None)[1]
    assert "UNAUTHENTICATED" in tokens.authorize(FakeContext("s3cret"), "Status", None)[1]
    lines = [r.getMessage() for r in caplog.records]
    assert "refused Join from peer 'alice' (token) claiming peer id 'bob': " in lines[0], lines
    assert len(lines) == 4, lines  # one line per refusal

    mtls = IdentityGuard(mutual_tls=True)
    assert mtls.authorize(_cert_ctx(["dtrain-peer:bob"]), "Sync", "bob")[1] == ""
    assert "may not act" in mtls.authorize(_cert_ctx(["dtrain-peer:bob"]), "Sync", "alice")[1]
    assert "acts as no peer" in mtls.authorize(_cert_ctx(cn="bob"), "Sync", "bob")[1]  # the CN does not count
    assert mtls.authorize(_cert_ctx(cn="bob"), "Status", None)[1] == ""  # ... but it may read the status
    assert "several" in mtls.authorize(_cert_ctx(["dtrain-peer:a", "dtrain-tool:b"]), "Status", None)[1]
    assert "no verified client certificate" in mtls.authorize(FakeContext(), "Status", None)[1]
    assert mtls.authorize(_cert_ctx(["spiffe://x/y", "dtrain-peer:bob"]), "Join", "bob")[1] == ""
    # both a certificate and an identity token: they must agree
    both = IdentityGuard(TokenPolicy.for_server(secret=SECRET), mutual_tls=True)
    assert both.authorize(_cert_ctx(["dtrain-peer:alice"], token=alice), "Join", "alice")[1] == ""
    assert "the token" in both.authorize(_cert_ctx(["dtrain-peer:bob"], token=alice), "Join", "bob")[1]
    assert both.authorize(_cert_ctx(cn="legacy", token=alice), "Join", "alice")[1] == ""

    # the shared token binds nothing, but a revoked id stays refused
    shared = IdentityGuard(TokenPolicy.for_server(token="s3cret"), revoked=["dave"])
    assert not shared.binding
    assert shared.authorize(FakeContext("s3cret"), "Join", "anyone")[1] == ""
    assert "revoked" in shared.authorize(FakeContext("s3cret"), "Join", "dave")[1]


@pytest.mark.timeout(30)
def test_revocation_list_file(tmp_path):
    p = tmp_path / "revoked"
    p.write_text("# revoked peers\nalice\n\n  bob   # lost laptop\nalice\n")
    assert auth.read_revoked(str(p)) == frozenset({"alice", "bob"})
    p.write_text("alice\nnot a peer id\n")
    with pytest.raises(ConfigError, match="line 2"):
        auth.read_revoked(str(p))
    with pytest.raises(ConfigError, match="cannot be read"):
        auth.read_revoked(str(tmp_path / "missing"))


# ---------------------------------------------------------------- the Coordinator


def _round_threads(clients: List[CoordinatorClient], box: dict) -> List[threading.Thread]:
    def sync(cl: CoordinatorClient) -> None:
        box[cl.peer_id] = cl.sync(0, H0, timeout=30)

    threads = [threading.Thread(target=sync, args=(cl,), daemon=True) for cl in clients]
    for t in threads:
        t.start()
    return threads


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_coordinator_refuses_another_peers_id_on_every_rpc(coordinators, ids, mode, tmp_path):
    c = coordinators(*coordinator_args(ids, mode, f"schema_hash={SCHEMA}", "min_peers=2", "grace_s=0.2"))
    alice = client(c.address, ids, mode, "alice", 7001)
    bob = client(c.address, ids, mode, "bob", 7002)
    channels = []
    try:
        alice.join(timeout=10)
        bob.join(timeout=10)
        box: dict = {}
        for t in _round_threads([alice, bob], box):
            t.join(30)
        q = box["bob"]
        assert isinstance(q, QuorumView) and sorted(q.ids) == ["alice", "bob"]

        # while the round is being voted on, carol (a genuine peer of the cluster), the status tool and a
        # certificate without identity claim bob's id, with bob's incarnation, on every RPC
        impostors = ["carol", "status"] + (["legacy"] if mode == "mtls" else [])
        for name in impostors:
            tls, token = creds(ids, mode, name)
            ch, stub = stub_for(c.address, tls)
            channels.append(ch)
            for method, request in requests_as("bob", bob.incarnation, q.quorum_id).items():
                code, details = call(stub, method, request, token)
                assert code == Code.PERMISSION_DENIED, (name, method, code, details)
                assert "'bob'" in details and (
                    "may not act" in details or "Status only" in details or "no peer" in details
                )
        # ... and nothing was applied: the round commits with both, bob keeps his address, nobody was excluded
        votes = {}
        threads = [
            threading.Thread(
                target=lambda cl=cl: votes.update({cl.peer_id: cl.commit(0, q.quorum_id, True, timeout=20)})
            )
            for cl in (alice, bob)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert votes == {"alice": CommitDecision.COMMIT, "bob": CommitDecision.COMMIT}
        status = {m.peer_id: m for m in alice.status().members}
        assert sorted(status) == ["alice", "bob"] and status["bob"].address == "127.0.0.1:7002"

        # the genuine identities work for every RPC
        assert alice.report(1, q.quorum_id, "nobody", "nothing") is False  # an ignored report, not a refusal
        bob._rpc("Heartbeat", pb.HeartbeatRequest(peer_id="bob", incarnation=bob.incarnation))
        alice.leave("done")
        assert [m.peer_id for m in bob.status().members] == ["bob"]

        # one log line per refusal, naming the presented identity and the claimed id
        log = c.stderr()
        via = "certificate" if mode == "mtls" else "token"
        for method in RPCS:
            for who in (f"peer 'carol' ({via})", f"tool 'status' ({via})"):
                lines = log_lines(log, f"refused {method} from {who} claiming peer id 'bob'")
                assert len(lines) == 1, (method, who, lines)
        if mode == "mtls":
            assert len(log_lines(log, "refused Join from a certificate without a dtrain identity (CN 'bob')")) == 1
        assert c.proc.poll() is None
    finally:
        for cl in (alice, bob):
            cl.close()
        for ch in channels:
            ch.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_tools_and_status(coordinators, ids, mode, tmp_path):
    """Status is open to every identity of the cluster (dtrain-status uses the tool's); strangers are refused."""
    c = coordinators(*coordinator_args(ids, mode))
    bob = client(c.address, ids, mode, "bob", 7002)
    try:
        bob.join(timeout=10)
        for name in ("status", "carol") + (("legacy",) if mode == "mtls" else ()):
            tls, token = creds(ids, mode, name)
            ch, stub = stub_for(c.address, tls)
            with ch:
                assert call(stub, "Status", pb.StatusRequest(), token)[0] == Code.OK, name
        if mode == "token":
            _, stub = stub_for(c.address, None)
            for token in (
                "",
                "s3cret",
                mint_token(OTHER_SECRET, PEER, "bob"),
                mint_token(OTHER_SECRET, TOOL, "status"),
            ):
                assert call(stub, "Status", pb.StatusRequest(), token)[0] == Code.UNAUTHENTICATED, token
                assert call(stub, "Join", requests_as("bob", "x")["Join"], token)[0] == Code.UNAUTHENTICATED
            assert log_lines(
                c.stderr(),
                "refused unauthenticated call to /dtrain.v1.Coordinator/Join: a token for "
                "'dtrain-peer:bob' of another cluster secret",
            )
            stranger = CoordinatorClient(
                c.address, "bob", "127.0.0.1:7009", SCHEMA, token=mint_token(OTHER_SECRET, PEER, "bob"), rpc_timeout=5
            )
            with pytest.raises(NotAuthenticated):
                stranger.join(timeout=5)
            stranger.close()
        tls, token = creds(ids, mode, "status")
        args = ["dtrain-status", f"coordinator={c.address}", "json=true"]
        env = None
        if mode == "mtls":
            args += [f"tls.ca={ids.ca_cert}", f"tls.cert={tls.cert}", f"tls.key={tls.key}"]
        else:
            env = {"DTRAIN_TOKEN": token}
        (r,) = _cli_all((args, env), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert '"peer_id": "bob"' in r.stdout
    finally:
        bob.close()


@pytest.mark.timeout(120)
def test_revoked_peers_are_refused_and_removed(coordinators, ids, tmp_path):
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("carol  # lost laptop\n")
    c = coordinators(*coordinator_args(ids, "token", f"control.revoked={revoked}", "min_peers=1", "grace_s=0.1"))
    alice = client(c.address, ids, "token", "alice", 7001)
    bob = client(c.address, ids, "token", "bob", 7002)
    carol = client(c.address, ids, "token", "carol", 7003)
    try:
        # revoked at start: refused, even for Status
        with pytest.raises(NotMember, match="revoked"):
            carol.join(timeout=5)
        with pytest.raises(NotMember, match="revoked"):
            carol.status()
        alice.join(timeout=10)
        bob.join(timeout=10)
        assert sorted(m.peer_id for m in alice.status().members) == ["alice", "bob"]

        # SIGHUP after adding bob: bob is removed at once and refused from then on
        revoked.write_text("carol\nbob\n")
        c.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: [m.peer_id for m in alice.status().members] == ["alice"], 10, "bob to be removed")
        for method, request in requests_as("bob", bob.incarnation).items():
            code, details = call(bob._stub, method, request, creds(ids, "token", "bob")[1])
            assert code == Code.PERMISSION_DENIED and "revoked" in details, (method, code, details)
        q = alice.sync(0, H0, timeout=20)  # the next round forms without bob
        assert isinstance(q, QuorumView) and q.ids == ["alice"]
        assert alice.commit(0, q.quorum_id, True, timeout=10) == CommitDecision.COMMIT
        log = c.stderr()
        assert len(log_lines(log, "removed from membership: bob")) == 1, log[-3000:]
        assert [ln for ln in log_lines(log, '"leave"') if '"bob"' in ln and '"revoked"' in ln], log[-3000:]

        # a list that cannot be read keeps the one in force (one error line)
        revoked.write_text("carol\nbob\nnot a peer id\n")
        c.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: log_lines(c.stderr(), "stays in force"), 10, "the error line")
        assert call(bob._stub, "Status", pb.StatusRequest(), creds(ids, "token", "bob")[1])[0] == Code.PERMISSION_DENIED
        # lifting it: bob may join again
        revoked.write_text("carol\n")
        c.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: log_lines(c.stderr(), "lifted: bob"), 10, "the reload")
        bob.join(timeout=10)
        assert sorted(m.peer_id for m in alice.status().members) == ["alice", "bob"]
        assert c.proc.poll() is None
    finally:
        for cl in (alice, bob, carol):
            cl.close()


@pytest.mark.timeout(60)
def test_a_coordinator_with_an_unreadable_revocation_list_does_not_start(tmp_path):
    r = _cli(
        ["dtrain-coordinator", f"state_dir={tmp_path / 's'}", f"control.revoked={tmp_path / 'missing'}"], cwd=tmp_path
    )
    assert r.returncode == 2 and "control.revoked=" in r.stderr and "cannot be read" in r.stderr, r.stderr


@pytest.mark.timeout(90)
def test_shared_token_mode_still_works(coordinators, tmp_path):
    """The old mode: one token for everyone, no identity bound (any holder may act as any id), revocation by id."""
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("mallory\n")
    c = coordinators("auth.token=s3cret", f"control.revoked={revoked}")
    cls = [
        CoordinatorClient(c.address, pid, f"127.0.0.1:{7000 + i}", SCHEMA, token="s3cret", rpc_timeout=5.0)
        for i, pid in enumerate(["a", "b", "mallory"])
    ]
    try:
        cls[0].join(timeout=10)
        cls[1].join(timeout=10)
        with pytest.raises(NotMember, match="revoked"):
            cls[2].join(timeout=5)
        assert sorted(m.peer_id for m in cls[0].status().members) == ["a", "b"]
        wrong = CoordinatorClient(c.address, "x", "127.0.0.1:7009", SCHEMA, token="wrong", rpc_timeout=5.0)
        with pytest.raises(NotAuthenticated):
            wrong.join(timeout=5)
        wrong.close()
        assert "the shared token binds no peer id" in c.stderr()
    finally:
        for cl in cls:
            cl.close()


# ---------------------------------------------------------------- the Peer service


@pytest.fixture
def peer_service(ids):
    """``start(mode, me)`` -> (servicer, inbox, address): the Peer service of ``me`` with ``me``'s credentials
    (its certificate serves TLS, and mutual TLS binds callers; or its token); stopped at teardown."""
    servers = []

    def start(mode: str, me: str = "alice", **kw):
        inbox = ShardInbox()
        svc = PeerServicer(SCHEMA, me, chunk_bytes=64, inbox=inbox, **kw)
        svc.set_snapshot(StateSnapshot.from_blobs(3, [("w", bytes(range(200)))], meta_json="{}"))
        tls, token = creds(ids, mode, me)
        server_tls = None
        if tls is not None:
            server_tls = TLSConfig(cert=tls.cert, key=tls.key, client_ca=ids.ca_cert)
        server, port = serve_peer(svc, token=token, tls=server_tls)
        servers.append(server)
        return svc, inbox, f"127.0.0.1:{port}"

    try:
        yield start
    finally:
        stop_servers(servers)


MEMBERS = ("alice", "bob", "carol")
NUMEL = 10
GOOD = FP32Codec().encode(torch.arange(NUMEL, dtype=torch.float32))


def _shard(sender: str, data: bytes = GOOD, **kw) -> pb.ShardChunk:
    fields = dict(quorum_id=7, round=0, op="all", phase=1, shard=0, sender=sender, codec="fp32", numel=NUMEL)
    fields.update(total_bytes=4 * NUMEL, offset=0, data=data)
    fields.update(kw)
    return pb.ShardChunk(**fields)


def _peer_call(address, ids, mode, name, fn) -> Tuple[Code, str, object]:
    tls, token = creds(ids, mode, name)
    with auth.make_channel(address, tls, MAX_MESSAGE_BYTES) as ch:
        try:
            return Code.OK, "", fn(pb_grpc.PeerStub(ch), _md(token) if token else ())
        except grpc.RpcError as e:
            return e.code(), e.details() or "", None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_peer_service_refuses_another_peers_id_on_every_rpc(peer_service, ids, mode, caplog):
    caplog.set_level("WARNING", logger="dtrain.comm")
    svc, inbox, address = peer_service(mode, "alice")
    key = (7, 0, "all")
    inbox.open(key, "alice", MEMBERS, FP32Codec(), {(1, 0, "bob"): NUMEL, (1, 0, "carol"): NUMEL})

    def header(requester):
        return lambda stub, md: stub.GetStateHeader(
            pb.StateRequest(schema_hash=SCHEMA, requester=requester), metadata=md, timeout=5
        )

    def stream(tid):
        return lambda stub, md: list(stub.StreamState(pb.StateChunkRequest(transfer_id=tid), metadata=md, timeout=5))

    def push(*chunks):
        return lambda stub, md: stub.PushShard(iter(chunks), metadata=md, timeout=5)

    # Ping names no peer: every identity of the cluster, tools included
    for name in ("bob", "status"):
        code, _, reply = _peer_call(
            address, ids, mode, name, lambda s, md: s.Ping(pb.PingRequest(), metadata=md, timeout=5)
        )
        assert code == Code.OK and reply.peer_id == "alice", name
    # GetStateHeader: the requester must be the caller
    code, _, bobs = _peer_call(address, ids, mode, "bob", header("bob"))
    assert code == Code.OK and bobs.round == 3
    code, details, _ = _peer_call(address, ids, mode, "carol", header("bob"))
    assert code == Code.PERMISSION_DENIED and "may not act as peer 'bob'" in details
    assert _peer_call(address, ids, mode, "status", header("status"))[0] == Code.PERMISSION_DENIED
    # StreamState: only the identity that opened the transfer reads it
    code, details, _ = _peer_call(address, ids, mode, "carol", stream(bobs.transfer_id))
    assert code == Code.PERMISSION_DENIED and "opened by peer 'bob'" in details
    code, _, chunks = _peer_call(address, ids, mode, "bob", stream(bobs.transfer_id))
    assert code == Code.OK and b"".join(c.data for c in chunks) == svc.snapshot.payload
    # PushShard: every chunk's sender must be the caller; carol's garbage in bob's name never reaches the inbox
    nan = b"\xff\xff\xff\x7f" * NUMEL
    code, details, _ = _peer_call(address, ids, mode, "carol", push(_shard("bob", nan)))
    assert code == Code.PERMISSION_DENIED and "may not act as peer 'bob'" in details
    code, _, _ = _peer_call(address, ids, mode, "carol", push(_shard("carol", GOOD[:8]), _shard("bob", nan, offset=8)))
    assert code == Code.PERMISSION_DENIED  # the stream stops at the first chunk in another's name
    assert _peer_call(address, ids, mode, "carol", push(_shard("carol", GOOD[8:], offset=8)))[0] == Code.OK
    assert _peer_call(address, ids, mode, "bob", push(_shard("bob")))[0] == Code.OK
    got = inbox.wait(key, 1, time.monotonic() + 5)  # the collective was not disturbed: no culprit, all values
    assert torch.equal(got[(0, "bob")], torch.arange(NUMEL, dtype=torch.float32))
    assert torch.equal(got[(0, "carol")], torch.arange(NUMEL, dtype=torch.float32))
    inbox.close(key)

    via = "certificate" if mode == "mtls" else "token"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    expected = {
        f"refused GetStateHeader from peer 'carol' ({via}) claiming peer id 'bob'": 1,
        f"refused GetStateHeader from tool 'status' ({via}) claiming peer id 'status'": 1,
        f"refused StreamState from peer 'carol' ({via}) claiming peer id 'bob'": 1,
        f"refused PushShard from peer 'carol' ({via}) claiming peer id 'bob'": 2,
    }
    for prefix, n in expected.items():
        assert sum(ln.startswith(prefix) for ln in lines) == n, (prefix, lines)
    assert len(lines) == sum(expected.values()), lines

    if mode == "token":  # tokens of another secret, or the shared kind: UNAUTHENTICATED
        with auth.make_channel(address, None, MAX_MESSAGE_BYTES) as ch:
            for token in ("s3cret", mint_token(OTHER_SECRET, PEER, "bob"), ""):
                with pytest.raises(grpc.RpcError) as e:
                    pb_grpc.PeerStub(ch).Ping(pb.PingRequest(), metadata=_md(token) if token else (), timeout=5)
                assert e.value.code() == Code.UNAUTHENTICATED
    else:  # no certificate, or one of another CA: no connection at all
        with auth.make_channel(address, TLSConfig(ca=ids.ca_cert), MAX_MESSAGE_BYTES) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.PeerStub(ch).Ping(pb.PingRequest(), timeout=5)
            assert e.value.code() == Code.UNAVAILABLE


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_state_download_binds_the_requester(peer_service, ids, mode):
    _, _, address = peer_service(mode, "alice")
    tls, token = creds(ids, mode, "bob")
    got = fetch_state(address, SCHEMA, token=token, tls=tls, requester="bob", min_round=3)
    assert got.round == 3
    with pytest.raises(StateTransferError, match="PERMISSION_DENIED"):
        fetch_state(address, SCHEMA, token=token, tls=tls, requester="carol", min_round=3, timeout=5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_grpc_collective_with_per_peer_identities(ids, mode):
    """The real data plane: each member serves with its own identity and pushes under it."""
    servers, cols, members = [], [], []
    try:
        for pid in MEMBERS:
            inbox = ShardInbox()
            tls, token = creds(ids, mode, pid)
            server_tls = TLSConfig(cert=tls.cert, key=tls.key, client_ca=ids.ca_cert) if tls else None
            server, port = serve_peer(PeerServicer(SCHEMA, pid, inbox=inbox), token=token, tls=server_tls)
            servers.append(server)
            cols.append(GrpcCollective(FP32Codec(), pid, token=token, tls=tls, chunk_bytes=1000, inbox=inbox))
            members.append((pid, f"127.0.0.1:{port}"))
        xs = [torch.randn(3000, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        out: list = [None] * 3

        def run(i):
            try:
                out[i] = cols[i].allreduce_mean(xs[i], Group(1, 0, tuple(members), MEMBERS[i]), 20.0)
            except Exception as e:  # noqa: BLE001 - asserted below
                out[i] = e

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(not isinstance(r, Exception) and r is not None for r in out), out
        assert torch.equal(out[0].tensor, out[1].tensor) and torch.equal(out[0].tensor, out[2].tensor)
        assert torch.allclose(out[0].tensor, sum(xs) / 3, atol=1e-5)
    finally:
        for col in cols:
            col.close()
        stop_servers(servers)


# ---------------------------------------------------------------- a run of model-free peers


@pytest.mark.timeout(120)
def test_a_run_with_per_peer_tokens_trains_heals_and_refuses_an_impostor(cluster, ids):
    """grpc data plane, identity tokens everywhere: the coordinator holds the secret, each peer its own token
    (its Peer service checks the others' against the key its token names); a late joiner heals from a donor;
    a peer holding carol's token that calls itself alice is refused and the run goes on."""
    tok = {p: Path(ids.tokens[p]).read_text().strip() for p in MEMBERS}
    c = cluster.start_coordinator(min_peers=2, **{"auth.secret": SECRET})
    grpc_flags = ("--backends", "grpc", "--transfer-chunk-bytes", "4096")
    peers = [cluster.start_peer(p, 30, *grpc_flags, "--token", tok[p]) for p in ("alice", "bob")]
    wait_until(lambda: c.committed_round() >= 4, 40, "4 committed rounds")
    impostor = cluster.start_peer("alice", 30, *grpc_flags, "--token", tok["carol"], "--join-timeout", "5")
    late = cluster.start_peer("carol", 30, *grpc_flags, "--token", tok["carol"])
    assert cluster.wait_exit([impostor], 20) == [1]
    assert "PERMISSION_DENIED" in impostor.stderr() and "may not act as peer 'alice'" in impostor.stderr()
    codes = cluster.wait_exit(peers + [late], 60)
    assert codes == [0, 0, 0], [p.stderr()[-800:] for p in peers + [late]]
    heals = late.records("heal")
    assert heals and heals[0]["donor"] in ("alice", "bob") and heals[0]["round"] >= 4
    assert len(log_lines(c.stderr(), "refused Join from peer 'carol' (token) claiming peer id 'alice'")) == 1
    check_parity(peers + [late])
    assert any("carol" in e["members"] for e in c.events("commit"))
    # the real alice was not disturbed: it left once, when it finished, and nobody was excluded
    assert not c.events("exclude")
    assert [e["reason"] for e in c.events("leave", peer_id="alice")] == ["finished"]


# ---------------------------------------------------------------- dtrain-certs and the launch scripts


@pytest.mark.timeout(60)
def test_dtrain_certs_issues_per_peer_identities(tmp_path):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    full, tokens_only, no_secret = _cli_all(
        (
            ["dtrain-certs", "out_dir=ids", "clients=[alice,bob]", "peer_hosts=[peer.example.org]"],
            {"DTRAIN_SECRET": SECRET},
        ),
        (
            ["dtrain-certs", "out_dir=tok", "clients=[alice]", "tools=[]", "certificates=false"],
            {"DTRAIN_SECRET": SECRET},
        ),
        (["dtrain-certs", "out_dir=none", "clients=[alice]", "certificates=false"], None),
        cwd=tmp_path,
    )
    assert full.returncode == 0, full.stderr
    out = tmp_path / "ids"
    names = ["ca", "server", "alice", "bob", "status"]
    expected = [f"{n}.pem" for n in names] + [f"{n}.key" for n in names] + ["alice.token", "bob.token", "status.token"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for n in ("alice.token", "bob.token", "status.token", "alice.key"):
        assert (out / n).stat().st_mode & 0o777 == 0o600, n
    assert (out / "alice.token").read_text() == mint_token(SECRET, PEER, "alice") + "\n"
    assert (out / "status.token").read_text() == mint_token(SECRET, TOOL, "status") + "\n"
    assert SECRET not in full.stdout + full.stderr and "dtrain-peer:alice:" not in full.stdout  # no secret printed

    def cert(name):
        c = x509.load_pem_x509_certificate((out / f"{name}.pem").read_bytes())
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        eku = list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        return c, san, eku

    alice, san, eku = cert("alice")
    assert alice.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "alice"
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["dtrain-peer:alice"]
    assert san.get_values_for_type(x509.DNSName) == ["peer.example.org"]  # it may serve its Peer service
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    _, san, eku = cert("status")
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["dtrain-tool:status"]
    assert eku == [ExtendedKeyUsageOID.CLIENT_AUTH]  # a tool serves nothing

    assert tokens_only.returncode == 0, tokens_only.stderr
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["alice.token"]
    assert no_secret.returncode == 2 and "DTRAIN_SECRET" in no_secret.stderr, no_secret.stderr
    assert not (tmp_path / "none").exists()


LAUNCH = str(Path(security.REPO) / "launch" / "torchrun.sh")
SBATCH = str(Path(security.REPO) / "launch" / "slurm" / "dtrain-peer.sbatch")


def _launch(script: str, *args: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    drop = ("DTRAIN_", "NNODES", "NPROC_PER_NODE", "NODE_RANK", "RDZV_", "SLURM_", "DRY_RUN", "TORCHRUN")
    full = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=30, env=full, cwd=cwd)


@pytest.mark.timeout(60)
def test_launch_scripts_use_the_peers_own_identity(ids, tmp_path):
    d = Path(ids.ca_cert).parent
    base = dict(DTRAIN_COORDINATOR="coord:7070", DTRAIN_IDENTITY_DIR=d)
    # the certificate, key, CA (also as client_ca: this peer's Peer service binds the others' calls) by its id
    r = _launch(LAUNCH, cwd=tmp_path, DRY_RUN=1, DTRAIN_PEER_ID="alice", **base)
    assert r.returncode == 0, r.stderr
    w = r.stdout.split()
    for a in (f"control.tls.cert={d}/alice.pem", f"control.tls.key={d}/alice.key", f"control.tls.ca={d}/ca.pem"):
        assert a in w, (a, w)
    assert f"control.tls.client_ca={d}/ca.pem" in w and "peer_id=alice" in w
    assert not any("TOKEN" in a.upper() or "dtrain-peer:" in a for a in w)  # the token stays in the environment
    # ... and its own token, in the environment of the peer (env stands in for dtrain-train and prints it)
    env_bin = shutil.which("env")
    r = _launch(LAUNCH, cwd=tmp_path, DTRAIN_TRAIN=env_bin, DTRAIN_PEER_ID="bob", **base)
    assert r.returncode == 0, r.stderr
    assert f"DTRAIN_TOKEN={mint_token(SECRET, PEER, 'bob')}" in r.stdout.splitlines()
    # an explicit DTRAIN_TOKEN wins over the directory's token file
    r = _launch(LAUNCH, cwd=tmp_path, DTRAIN_TRAIN=env_bin, DTRAIN_PEER_ID="bob", DTRAIN_TOKEN="shared", **base)
    assert "DTRAIN_TOKEN=shared" in r.stdout.splitlines()
    (tmp_path / "empty.token").write_text("")
    (tmp_path / "bob.token").write_text(mint_token(SECRET, PEER, "bob"))  # no newline at the end: still read
    r = _launch(LAUNCH, cwd=tmp_path, DTRAIN_TRAIN=env_bin, DTRAIN_TOKEN_FILE=tmp_path / "bob.token")
    assert f"DTRAIN_TOKEN={mint_token(SECRET, PEER, 'bob')}" in r.stdout.splitlines()
    refusals = [
        (dict(DTRAIN_PEER_ID="dave", **base), "dave.pem"),  # nothing issued for this id
        (dict(DTRAIN_IDENTITY_DIR=d), "without a peer id"),
        (dict(DTRAIN_IDENTITY_DIR=tmp_path / "nowhere", DTRAIN_PEER_ID="a"), "not a directory"),
        (dict(DTRAIN_TOKEN_FILE=tmp_path / "empty.token"), "first line is empty"),
        (dict(DTRAIN_TOKEN_FILE=tmp_path / "missing"), "not a readable file"),
        (dict(DTRAIN_TOKEN_FILE=tmp_path / "bob.token", DTRAIN_TOKEN="x"), "with DTRAIN_TOKEN set"),
    ]
    for env, msg in refusals:
        r = _launch(LAUNCH, cwd=tmp_path, DRY_RUN=1, **env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], (env, r.stderr)
    # the Slurm script: identities are per peer id, so the id must be given (not slurm-<job id>)
    r = _launch(
        SBATCH,
        cwd=tmp_path,
        SLURM_JOB_ID=42,
        SLURM_SUBMIT_DIR=security.REPO,
        DTRAIN_COORDINATOR="coord:7070",
        DTRAIN_IDENTITY_DIR=d,
        SRUN="false",
        SCONTROL="false",
        SCANCEL="false",
    )
    assert r.returncode == 2 and "DTRAIN_PEER_ID=''" in r.stderr and "DTRAIN_IDENTITY_DIR" in r.stderr, r.stderr


@pytest.mark.timeout(120)
def test_an_unconfirmed_accusation_is_ignored_and_a_confirmed_one_acted_on(coordinators, ids, tmp_path):
    """Report over the wire: one accuser's word excludes nobody; a second accuser's does (both with evidence)."""
    c = coordinators(*coordinator_args(ids, "token", f"schema_hash={SCHEMA}", "min_peers=3", "grace_s=0.2"))
    alice, _, carol = peers = [client(c.address, ids, "token", name, 7001 + i) for i, name in enumerate(ALL3)]
    try:
        for cl in peers:
            cl.join(timeout=10)
        box: dict = {}
        for t in _round_threads(peers, box):
            t.join(30)
        q = box["alice"]
        assert isinstance(q, QuorumView) and sorted(q.ids) == sorted(ALL3)
        assert alice.report(0, q.quorum_id, "bob", "sent garbage", evidence="ab" * 32) is False
        assert "bob" in [m.peer_id for m in alice.status().members]  # one word is not enough
        assert carol.report(0, q.quorum_id, "bob", "sent garbage", evidence="cd" * 32) is True
        assert "bob" not in [m.peer_id for m in alice.status().members]
        log = tmp_path / "coord0" / "events.jsonl"  # the fixture's first coordinator's state_dir
        events = wait_until(
            lambda: [json.loads(ln) for ln in log.read_text().splitlines() if '"exclude"' in ln] and read_jsonl(log),
            10,
            "the exclusion in the event log",
        )
        reports = [e for e in events if e["event"] == "report"]
        assert [(e["peer_id"], e["evidence"]) for e in reports] == [("alice", "ab" * 32), ("carol", "cd" * 32)]
        excluded = [e for e in events if e["event"] == "exclude"]
        assert [e["peer_id"] for e in excluded] == ["bob"] and "confirmed" in excluded[0]["reason"], excluded
    finally:
        for cl in peers:
            cl.close()
