"""Control-plane security against real coordinator processes.

Token auth, TLS, mutual TLS, switching reflection off, a fuzzer that sends
random and mangled bytes to every method the server lists through
reflection, and the ``dtrain-status`` / ``dtrain-certs`` commands. Every
coordinator is a child process on 127.0.0.1 with port 0; the ``coordinators``
fixture stops exactly the processes it started.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dtrain.config import TLSConfig
from dtrain.control import certs
from dtrain.control.client import CoordinatorClient, NotAuthenticated, NotMember
from dtrain.v1 import dtrain_pb2 as pb
from dtrain.v1 import dtrain_pb2_grpc as pb_grpc
from dtrain.wire.auth import make_channel
from dtrain.wire.outcomes import CommitDecision

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TOKEN = "s3cret-Token_42"
SCHEMA = "schema-0123456789abcdef"
MB = 2**20
Code = grpc.StatusCode


# ---------------------------------------------------------------- coordinator processes


@dataclass
class Coordinator:
    proc: subprocess.Popen
    address: str
    log: Path  # its stderr

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    box: List[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


@pytest.fixture
def coordinators(tmp_path):
    """``start(*overrides, env_token=None)`` -> a running Coordinator; all stopped at teardown."""
    started: List[Coordinator] = []

    def start(*overrides: str, env_token: Optional[str] = None) -> Coordinator:
        n = len(started)
        env = {k: v for k, v in os.environ.items() if k not in ("DTRAIN_TOKEN", "DTRAIN_SECRET")}
        env["PYTHONUNBUFFERED"] = "1"
        if env_token is not None:
            env["DTRAIN_TOKEN"] = env_token
        if not any(o.startswith("lease_timeout_s=") for o in overrides):
            overrides += ("lease_timeout_s=60",)  # members stay listed on a slow, loaded machine
        log = tmp_path / f"coordinator{n}.stderr"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dtrain.cli.coordinator",
                    f"state_dir={tmp_path / f'coord{n}'}",
                    "host=127.0.0.1",
                    "port=0",
                    *overrides,
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=tmp_path,
                text=True,
            )
        c = Coordinator(proc, "", log)
        started.append(c)
        line = _first_line(proc, 30.0)
        m = re.match(r"coordinator listening on (\S+:\d+)$", line.strip())
        assert m, f"coordinator did not start (first line {line!r}):\n{c.stderr()[-3000:]}"
        c.address = m.group(1)
        return c

    try:
        yield start
    finally:
        for c in started:
            c.stop()


def _channel(address: str, tls: Optional[TLSConfig] = None, max_mb: float = 8) -> grpc.Channel:
    return make_channel(address, tls, int(max_mb * MB))


def _md(token: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


def _join_request(peer_id: str, incarnation: str = "inc-1") -> pb.JoinRequest:
    return pb.JoinRequest(
        peer_id=peer_id, address="127.0.0.1:7001", schema_hash=SCHEMA, world_size=1, incarnation=incarnation
    )


def _code(fn, *args, **kwargs) -> Code:
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code()
    return Code.OK


def _serving(address: str, tls: Optional[TLSConfig] = None, service: str = "") -> bool:
    with _channel(address, tls) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return r.status == health_pb2.HealthCheckResponse.SERVING


def _client(
    address: str, peer_id: str, token: str = "", tls: Optional[TLSConfig] = None, region: str = "", port: int = 7001
) -> CoordinatorClient:
    return CoordinatorClient(
        address,
        peer_id,
        f"127.0.0.1:{port}",
        SCHEMA,
        world_size=2,
        region=region,
        token=token,
        tls=tls,
        rpc_timeout=5.0,
    )


def _cli_env(extra: Optional[dict]) -> dict:
    """The environment for a console script: no token or secret, no gRPC log setting, unless given."""
    env = {k: v for k, v in os.environ.items() if k not in ("DTRAIN_TOKEN", "DTRAIN_SECRET", "GRPC_VERBOSITY")}
    env.update(extra or {})
    return env


def _cli(args: List[str], cwd: Path, env: Optional[dict] = None, timeout: float = 60):
    return subprocess.run(
        [str(VENV_BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_cli_env(env),
        timeout=timeout,
    )


def _cli_all(*runs, cwd: Path, timeout: float = 60) -> List[subprocess.CompletedProcess]:
    """Several ``(args, env)`` console-script runs at once (their start-up dominates)."""
    procs = []
    for args, env in runs:
        full = _cli_env(env)
        procs.append(
            (
                args,
                subprocess.Popen(
                    [str(VENV_BIN / args[0]), *args[1:]],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=cwd,
                    env=full,
                ),
            )
        )
    out = []
    try:
        for args, p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(args, p.returncode, stdout, stderr))
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _one_error_line(r, prog: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------- (a) token


@pytest.mark.timeout(60)
def test_token_guards_join_and_status(coordinators):
    c = coordinators(f"auth.token={TOKEN}", f"schema_hash={SCHEMA}")
    with _channel(c.address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        for token in (None, "", "wrong", TOKEN + "x", TOKEN[:-1]):
            assert _code(stub.Join, _join_request("p1"), metadata=_md(token), timeout=5) == Code.UNAUTHENTICATED
            assert _code(stub.Status, pb.StatusRequest(), metadata=_md(token), timeout=5) == Code.UNAUTHENTICATED
        # a near miss of the header's form is no token either
        bad = (("authorization", TOKEN),)
        assert _code(stub.Status, pb.StatusRequest(), metadata=bad, timeout=5) == Code.UNAUTHENTICATED
        # the right token works
        r = stub.Join(_join_request("p1"), metadata=_md(TOKEN), timeout=5)
        assert r.lease_timeout_ms > 0
        s = stub.Status(pb.StatusRequest(), metadata=_md(TOKEN), timeout=5)
        assert [m.peer_id for m in s.members] == ["p1"]
        # health checks need no token
        for service in ("", "dtrain.v1.Coordinator"):
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING

    for token in ("", "wrong"):
        cl = _client(c.address, "p2", token=token)
        try:
            with pytest.raises(NotAuthenticated):
                cl.join(timeout=5)
            with pytest.raises(NotAuthenticated):
                cl.status()
        finally:
            cl.close()
    cl = _client(c.address, "p2", token=TOKEN)
    try:
        assert cl.join(timeout=5).min_peers == 1
        assert sorted(m.peer_id for m in cl.status().members) == ["p1", "p2"]
    finally:
        cl.close()
    assert c.proc.poll() is None


@pytest.mark.timeout(60)
def test_token_from_environment(coordinators):
    c = coordinators(env_token=TOKEN)
    cl = _client(c.address, "env-peer", token="wrong")
    try:
        with pytest.raises(NotAuthenticated):
            cl.join(timeout=5)
    finally:
        cl.close()
    cl = _client(c.address, "env-peer", token=TOKEN)
    try:
        cl.join(timeout=5)
        assert [m.peer_id for m in cl.status().members] == ["env-peer"]
    finally:
        cl.close()
    assert _serving(c.address)


# ---------------------------------------------------------------- (b, c) TLS and mutual TLS


@pytest.fixture
def cert_dirs(tmp_path):
    good = certs.generate(str(tmp_path / "certs"), hosts=["localhost", "127.0.0.1"], clients=["client", "mtls-peer"])
    other = certs.generate(str(tmp_path / "other"), hosts=["localhost", "127.0.0.1"], clients=["client", "mtls-peer"])
    return good, other


@pytest.mark.timeout(60)
def test_tls(coordinators, cert_dirs, tmp_path):
    good, other = cert_dirs
    c = coordinators(f"tls.cert={good.server_cert}", f"tls.key={good.server_key}")
    tls = TLSConfig(ca=good.ca_cert)
    assert _serving(c.address, tls)
    with _channel(c.address, tls) as ch:
        assert pb_grpc.CoordinatorStub(ch).Status(pb.StatusRequest(), timeout=5).min_peers == 1
    cl = _client(c.address, "tls-peer", tls=tls)
    try:
        assert cl.join(timeout=5).committed_round == 0
    finally:
        cl.close()
    # a name from the certificate's DNS SANs works too
    with _channel(c.address, TLSConfig(ca=good.ca_cert, server_name="localhost")) as ch:
        assert _code(pb_grpc.CoordinatorStub(ch).Status, pb.StatusRequest(), timeout=5) == Code.OK

    # plaintext, a CA that did not sign the server certificate, a name not in it: all fail
    for bad in (None, TLSConfig(ca=other.ca_cert), TLSConfig(ca=good.ca_cert, server_name="elsewhere.example")):
        with _channel(c.address, bad) as ch:
            assert _code(pb_grpc.CoordinatorStub(ch).Status, pb.StatusRequest(), timeout=5) == Code.UNAVAILABLE

    # dtrain-status: works with tls.ca; without it: one line naming the address, exit 1
    ok, r = _cli_all(
        (["dtrain-status", f"coordinator={c.address}", f"tls.ca={good.ca_cert}"], None),
        (["dtrain-status", f"coordinator={c.address}", "timeout_s=5"], None),
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert "tls-peer" in ok.stdout
    assert r.returncode == 1, r.stdout + r.stderr
    assert c.address in _one_error_line(r, "dtrain-status")
    assert c.proc.poll() is None


@pytest.mark.timeout(60)
def test_mutual_tls(coordinators, cert_dirs, tmp_path):
    good, other = cert_dirs
    c = coordinators(f"tls.cert={good.server_cert}", f"tls.key={good.server_key}", f"tls.client_ca={good.ca_cert}")
    cert, key = good.clients["mtls-peer"]
    other_cert, other_key = other.clients["mtls-peer"]
    with_cert = TLSConfig(ca=good.ca_cert, cert=cert, key=key)
    for bad in (None, TLSConfig(ca=good.ca_cert), TLSConfig(ca=good.ca_cert, cert=other_cert, key=other_key)):
        with _channel(c.address, bad) as ch:
            assert _code(pb_grpc.CoordinatorStub(ch).Status, pb.StatusRequest(), timeout=5) == Code.UNAVAILABLE
    with _channel(c.address, with_cert) as ch:
        assert _code(pb_grpc.CoordinatorStub(ch).Status, pb.StatusRequest(), timeout=5) == Code.OK
    cl = _client(c.address, "mtls-peer", tls=with_cert)
    # the certificate names its peer: another one's (here peer 'client') cannot join as 'mtls-peer'
    client_cert, client_key = good.clients["client"]
    impostor = _client(c.address, "mtls-peer", tls=TLSConfig(ca=good.ca_cert, cert=client_cert, key=client_key))
    try:
        with pytest.raises(NotMember, match="may not act as peer 'mtls-peer'"):
            impostor.join(timeout=5)
        cl.join(timeout=5)
        assert [m.peer_id for m in cl.status().members] == ["mtls-peer"]
        assert [m.peer_id for m in impostor.status().members] == ["mtls-peer"]  # Status: any certificate of the CA
    finally:
        cl.close()
        impostor.close()
    tool_cert, tool_key = good.tools["status"]
    bad, ok = _cli_all(
        (["dtrain-status", f"coordinator={c.address}", f"tls.ca={good.ca_cert}", "timeout_s=5"], None),
        (
            [
                "dtrain-status",
                f"coordinator={c.address}",
                f"tls.ca={good.ca_cert}",
                f"tls.cert={tool_cert}",
                f"tls.key={tool_key}",
                "json=true",
            ],
            None,
        ),
        cwd=tmp_path,
    )
    assert bad.returncode == 1 and c.address in _one_error_line(bad, "dtrain-status")
    assert ok.returncode == 0, ok.stderr
    assert [m["peer_id"] for m in json.loads(ok.stdout)["members"]] == ["mtls-peer"]
    assert "refused Join from peer 'client' (certificate) claiming peer id 'mtls-peer'" in c.stderr()


# ---------------------------------------------------------------- (d) fuzzing every method


@dataclass
class Method:
    path: str
    request: type  # message class of the request
    client_streaming: bool
    server_streaming: bool


def reflected_methods(channel: grpc.Channel, token: Optional[str]) -> List[Method]:
    """Every method of every service the server lists, with its request type, via reflection."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**kw):
        replies = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(**kw)]), metadata=_md(token), timeout=5
            )
        )
        assert len(replies) == 1 and not replies[0].HasField("error_response"), replies
        return replies[0]

    pool = descriptor_pool.DescriptorPool()
    added = set()
    out = []
    for svc in ask(list_services="").list_services_response.service:
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in ask(file_containing_symbol=svc.name).file_descriptor_response.file_descriptor_proto
        ]
        pending = [f for f in files if f.name not in added]
        while pending:  # dependencies first
            ready = [f for f in pending if all(d in added for d in f.dependency)]
            assert ready, f"unresolvable dependencies in {[f.name for f in pending]}"
            for f in ready:
                pool.Add(f)
                added.add(f.name)
            pending = [f for f in pending if f.name not in added]
        desc = pool.FindServiceByName(svc.name)
        for m in desc.methods:
            out.append(
                Method(
                    f"/{desc.full_name}/{m.name}",
                    message_factory.GetMessageClass(m.input_type),
                    m.client_streaming,
                    m.server_streaming,
                )
            )
    return out


_INTS = {  # boundary values per protobuf integer type
    FieldDescriptor.TYPE_UINT32: [0, 1, 2, 7, 2**31 - 1, 2**31, 2**32 - 1],
    FieldDescriptor.TYPE_UINT64: [0, 1, 2, 3, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1],
    FieldDescriptor.TYPE_INT32: [0, 1, -1, 2**31 - 1, -(2**31)],
    FieldDescriptor.TYPE_INT64: [0, 1, -1, 2**63 - 1, -(2**63)],
}


def _random_string(rng: random.Random, known: List[str]) -> str:
    pick = rng.random()
    if pick < 0.35:
        return rng.choice(known)
    if pick < 0.5:
        return rng.choice(
            [
                "",
                " ",
                "\n",
                "x\n",
                "a" * 128,
                "a" * 129,
                "é" * 40,
                "\x00",
                "../../etc/passwd",
                "%s%n{0}",
                "[::1]:65536",
                "127.0.0.1:99999",
                "h:0",
                "\ud7ff\ue000",
                "🙂" * 10,
            ]
        )
    n = rng.choice([1, 2, 8, 64, 300, 5000])
    return "".join(
        chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)]))
        for _ in range(n)
    )


def random_message(cls, rng: random.Random, known: List[str], depth: int = 0):
    """A well-typed message with random, often boundary, field values."""
    msg = cls()
    for f in cls.DESCRIPTOR.fields:
        if rng.random() < 0.25:
            continue
        n = rng.choice([0, 1, 2, 5]) if f.is_repeated else 1
        for _ in range(n):
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 3:
                    break
                sub = random_message(message_factory.GetMessageClass(f.message_type), rng, known, depth + 1)
                (getattr(msg, f.name).add().CopyFrom(sub) if f.is_repeated else getattr(msg, f.name).CopyFrom(sub))
                continue
            if f.type == FieldDescriptor.TYPE_STRING:
                v = _random_string(rng, known)
            elif f.type == FieldDescriptor.TYPE_BYTES:
                v = rng.randbytes(rng.choice([0, 1, 100, 4096]))
            elif f.type == FieldDescriptor.TYPE_BOOL:
                v = rng.random() < 0.5
            elif f.type == FieldDescriptor.TYPE_ENUM:
                v = rng.choice([0, 1, 2, 3, 99, 2**31 - 1, -1])
            elif f.type in _INTS:
                v = rng.choice(_INTS[f.type])
            elif f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
                v = rng.choice([0.0, -1.0, 1e308, float("inf"), float("nan")])
            else:
                v = 0
            if f.is_repeated:
                getattr(msg, f.name).append(v)
            else:
                setattr(msg, f.name, v)
    return msg


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data or b"\x00")
    for _ in range(rng.randint(1, 4)):
        op, i = rng.randrange(4), rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            del b[i:]
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        else:  # a field header with a huge length / odd wire type
            b[i:i] = bytes([rng.randrange(256), 0xFF, 0xFF, 0xFF, 0xFF, 0x0F])
        if not b:
            b = bytearray(b"\x00")
    return bytes(b)


def fuzz_inputs(m: Method, rng: random.Random, known: List[str], limit: int) -> List[bytes]:
    inputs = [b""]
    inputs += [rng.randbytes(rng.choice([1, 2, 5, 17, 200, 4096])) for _ in range(6)]
    typed = [random_message(m.request, rng, known).SerializeToString() for _ in range(8)]
    inputs += typed + [_mutate(rng.choice(typed), rng) for _ in range(6)]
    # huge but under the limit: a typed message with one long string (or bytes), and raw noise
    big = m.request()
    text = [f for f in m.request.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated]
    if text:
        setattr(big, text[0].name, "z" * (limit - 4096))
        inputs.append(big.SerializeToString())
    inputs.append(rng.randbytes(limit - 1024))
    inputs.append(rng.randbytes(limit + 1))  # over the limit
    return inputs


def raw_call(
    channel: grpc.Channel, m: Method, data: bytes, token: Optional[str], timeout: float = 3.0
) -> Tuple[Code, str]:
    """Send ``data`` as the (only) request message; the status, or OK on a first response message."""
    kw = dict(request_serializer=None, response_deserializer=None)
    md = _md(token)
    try:
        if m.client_streaming and m.server_streaming:
            call = channel.stream_stream(m.path, **kw)(iter([data]), metadata=md, timeout=timeout)
        elif m.server_streaming:
            call = channel.unary_stream(m.path, **kw)(data, metadata=md, timeout=timeout)
        elif m.client_streaming:
            channel.stream_unary(m.path, **kw)(iter([data]), metadata=md, timeout=timeout)
            return Code.OK, ""
        else:
            channel.unary_unary(m.path, **kw)(data, metadata=md, timeout=timeout)
            return Code.OK, ""
        try:
            next(call)
        except StopIteration:
            pass
        call.cancel()
        return Code.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def _parse_failure(code: Code, details: str) -> bool:
    """A refused malformed request. grpc.aio reports a request it cannot parse as UNKNOWN
    'Unexpected <class DecodeError>' (the handler never runs); INVALID_ARGUMENT is the cleaner answer."""
    return code == Code.INVALID_ARGUMENT or (code == Code.UNKNOWN and "DecodeError" in details)


# grpcio-health-checking 1.85 registers Health/List but its servicers do not implement it: the base
# class answers UNIMPLEMENTED (and grpc logs the NotImplementedError) -- a clean refusal, not a crash.
UNIMPLEMENTED_UPSTREAM = {"/grpc.health.v1.Health/List"}

_HANDLED = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.FAILED_PRECONDITION,
    Code.ALREADY_EXISTS,
    Code.ABORTED,
    Code.PERMISSION_DENIED,
    Code.NOT_FOUND,
    Code.OUT_OF_RANGE,
    Code.RESOURCE_EXHAUSTED,
    Code.DEADLINE_EXCEEDED,
}


@pytest.mark.timeout(120)
def test_fuzz_every_method(coordinators):
    limit = MB
    c = coordinators(
        f"auth.token={TOKEN}", f"schema_hash={SCHEMA}", "max_message_mb=1", "max_wait_s=0.2", "grace_s=0.1"
    )
    member = _client(c.address, "fz-member", token=TOKEN)
    member.join(timeout=5)
    known = [
        "fz-member",
        member.incarnation,
        SCHEMA,
        "127.0.0.1:7001",
        "fz-other",
        "dtrain.v1.Coordinator",
        "grpc.health.v1.Health",
        "dtrain/v1/dtrain.proto",
    ]
    ch = _channel(c.address, max_mb=8)  # sends past the server's limit, so the server must refuse
    try:
        methods = reflected_methods(ch, TOKEN)
        paths = {m.path for m in methods}
        for name in ("Join", "Heartbeat", "Leave", "Sync", "Commit", "Status"):
            assert f"/dtrain.v1.Coordinator/{name}" in paths
        assert "/grpc.health.v1.Health/Check" in paths
        assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in paths

        problems, calls = [], 0
        for m in methods:
            open_method = m.path.startswith("/grpc.health.v1.Health/")
            for token in (TOKEN, None):
                rng = random.Random(f"{m.path}|{token}")
                for data in fuzz_inputs(m, rng, known, limit):
                    code, details = raw_call(ch, m, data, token)
                    calls += 1
                    what = f"{m.path} token={'yes' if token else 'no'} {len(data)} bytes {data[:24]!r}"
                    if len(data) > limit:  # without a token the refusal may come before the size check
                        ok = code == Code.RESOURCE_EXHAUSTED or (
                            code == Code.UNAUTHENTICATED and token is None and not open_method
                        )
                    elif token is None and not open_method:
                        ok = code == Code.UNAUTHENTICATED
                    else:
                        ok = (
                            code in _HANDLED
                            or _parse_failure(code, details)
                            or (code == Code.UNIMPLEMENTED and m.path in UNIMPLEMENTED_UPSTREAM)
                        )
                    if not ok:
                        problems.append(f"{what} -> {code.name}: {details[:200]}")
                assert c.proc.poll() is None, f"the coordinator died during {m.path}:\n{c.stderr()[-3000:]}"
        assert not problems, f"{len(problems)} of {calls} calls got unexpected answers:\n" + "\n".join(problems[:20])
        assert calls > 400
    finally:
        ch.close()
        member.close()

    # still healthy, still serving normal calls
    assert _serving(c.address) and _serving(c.address, service="dtrain.v1.Coordinator")
    with _channel(c.address) as ch2:
        stub = pb_grpc.CoordinatorStub(ch2)
        stub.Join(_join_request("after-fuzz"), metadata=_md(TOKEN), timeout=5)
        s = stub.Status(pb.StatusRequest(), metadata=_md(TOKEN), timeout=5)
        assert "after-fuzz" in [x.peer_id for x in s.members] and s.schema_hash == SCHEMA
    # no handler raised anything but a parse error of the request
    log = c.stderr()
    raised = {
        (exc, path)
        for exc, path in re.findall(r"Unexpected \[(\w+)\] raised by servicer method \[(\S+)\]", log)
        if exc != "DecodeError" and not (exc == "NotImplementedError" and path in UNIMPLEMENTED_UPSTREAM)
    }
    assert not raised, f"handlers raised {sorted(raised)}:\n{log[-3000:]}"
    for marker in ("Task exception was never retrieved", "Exception in callback", "Fatal Python error"):
        assert marker not in log, log[-3000:]
    assert c.proc.poll() is None


# ---------------------------------------------------------------- (e) reflection off


@pytest.mark.timeout(60)
def test_reflection_can_be_switched_off(coordinators):
    c = coordinators("reflection=false", f"auth.token={TOKEN}")
    with _channel(c.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        for token in (TOKEN, None):
            assert (
                _code(lambda token=token: list(stub.ServerReflectionInfo(iter([req]), metadata=_md(token), timeout=5)))
                == Code.UNIMPLEMENTED
            )
        assert _code(pb_grpc.CoordinatorStub(ch).Status, pb.StatusRequest(), metadata=_md(TOKEN), timeout=5) == Code.OK
    assert _serving(c.address)


# ---------------------------------------------------------------- (f) dtrain-status


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_in_process(capsys, monkeypatch, argv: List[str]) -> subprocess.CompletedProcess:
    from dtrain.cli import status

    monkeypatch.delenv("DTRAIN_TOKEN", raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_app rewrites sys.argv for Hydra
    capsys.readouterr()
    try:
        status.main(argv)
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["dtrain-status", *argv], rc, out.out, out.err)


@pytest.mark.timeout(90)
def test_dtrain_status(coordinators, tmp_path, capsys, monkeypatch):
    c = coordinators(f"auth.token={TOKEN}", "min_peers=2", "grace_s=0.1")
    peers = [
        _client(c.address, "peer-a", token=TOKEN, region="eu", port=7001),
        _client(c.address, "peer-b", token=TOKEN, port=7002),
    ]
    results = {}

    seen = {"peer-a": (0.5, 1.0), "peer-b": (40.0, 0.0125)}  # what both members saw: b was clipped hard

    def one_round(cl: CoordinatorClient) -> None:
        q = cl.sync(0, "h0-0123456789abcdef", timeout=20)
        results[cl.peer_id] = cl.commit(q.round, q.quorum_id, True, timeout=20, contributions=seen)

    try:
        for p in peers:
            p.join(timeout=5)
            p.start_heartbeat()
        threads = [threading.Thread(target=one_round, args=(p,)) for p in peers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {"peer-a": CommitDecision.COMMIT, "peer-b": CommitDecision.COMMIT}

        cwd = tmp_path / "cwd"
        cwd.mkdir()
        r, rj = _cli_all(
            (["dtrain-status", f"coordinator={c.address}", f"auth.token={TOKEN}"], None),
            (["dtrain-status", f"coordinator={c.address}", "json=true"], {"DTRAIN_TOKEN": TOKEN}),
            cwd=cwd,
        )
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        header = lines[0]
        for part in ("committed round 1", "quorum 1", "phase ", "min_peers 2", f"schema {SCHEMA[:12]}"):
            assert part in header, header
        for col in ("id", "address", "region", "world size", "state", "round", "lease age", "|Δ| (round)", "clip"):
            assert col in r.stdout
        rows = {ln.split("|")[0].strip(): [x.strip() for x in ln.split("|")] for ln in lines if "|" in ln}
        assert rows["peer-a"][1:6] == ["127.0.0.1:7001", "eu", "2", "active", "1"], rows["peer-a"]
        assert rows["peer-b"][1:3] == ["127.0.0.1:7002", "-"]
        assert rows["peer-a"][7:9] == ["0.5 (0)", "1"] and rows["peer-b"][7:9] == ["40 (0)", "0.0125"], rows
        commit_rows = [ln for ln in lines if "h0-0123" in ln]  # members listed in ring order
        assert len(commit_rows) == 1, r.stdout
        cells = [x.strip() for x in commit_rows[0].split("|")]
        assert cells[:2] == ["0", "1"] and sorted(cells[2].split(",")) == ["peer-a", "peer-b"], cells
        assert cells[3] == "h0-012345678", cells

        assert rj.returncode == 0, rj.stderr
        d = json.loads(rj.stdout)
        assert d["committed_round"] == 1 and d["min_peers"] == 2 and d["schema_hash"] == SCHEMA
        assert [m["peer_id"] for m in d["members"]] == ["peer-a", "peer-b"]
        assert d["members"][1]["contribution"] == {"round": 0, "norm": 40.0, "clip": 0.012500000186264515}
        assert [(x["round"], sorted(x["members"])) for x in d["commits"]] == [(0, ["peer-a", "peer-b"])]

        # the failures, in-process (cheaper than another interpreter start): one line, exit status 1
        rw = _status_in_process(capsys, monkeypatch, [f"coordinator={c.address}", "auth.token=wrong"])
        assert rw.returncode == 1 and rw.stdout == ""
        line = _one_error_line(rw, "dtrain-status")
        assert c.address in line and "token" in line
        dead = f"127.0.0.1:{_closed_port()}"
        rd = _status_in_process(capsys, monkeypatch, [f"coordinator={dead}", "timeout_s=3"])
        assert rd.returncode == 1 and rd.stdout == ""
        assert dead in _one_error_line(rd, "dtrain-status")

        assert list(cwd.iterdir()) == [], "dtrain-status left files behind"
    finally:
        for p in peers:
            p.close()


# ---------------------------------------------------------------- (g) dtrain-certs


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.timeout(60)
def test_dtrain_certs(tmp_path):
    from cryptography import x509

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = _cli(
        [
            "dtrain-certs",
            "out_dir=certs",
            "hosts=[localhost,127.0.0.1,coord.example.org]",
            "clients=[client,alice]",
            "days=30",
        ],
        cwd=cwd,
    )
    assert r.returncode == 0, r.stderr
    out = cwd / "certs"
    assert sorted(p.name for p in cwd.iterdir()) == ["certs"], "dtrain-certs left files behind"
    names = ["ca", "server", "client", "alice", "status"]  # status: the tool identity, written by default
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.pem" for n in names] + [f"{n}.key" for n in names])
    for n in names:
        assert _mode(out / f"{n}.key") == 0o600, n
    for key in ("tls.cert=", "tls.key=", "tls.client_ca=", "tls.ca="):
        assert key in r.stdout
    assert str(out / "server.pem") in r.stdout and str(out / "ca.pem") in r.stdout

    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    alice = x509.load_pem_x509_certificate((out / "alice.pem").read_bytes())
    alice.verify_directly_issued_by(ca)
    assert 29 <= (alice.not_valid_after_utc - alice.not_valid_before_utc).days <= 31
    uris = alice.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == ["dtrain-peer:alice"]  # the peer's identity

    before = (out / "ca.pem").read_bytes()
    r = _cli(["dtrain-certs", "out_dir=certs"], cwd=cwd)
    assert r.returncode == 1
    line = _one_error_line(r, "dtrain-certs")
    assert str(out / "ca.pem") in line and "overwrite=true" in line
    assert (out / "ca.pem").read_bytes() == before

    (out / "status.key").chmod(0o644)
    r = _cli(["dtrain-certs", "out_dir=certs", "overwrite=true"], cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert (out / "ca.pem").read_bytes() != before
    assert _mode(out / "status.key") == 0o600
    assert sorted(p.name for p in cwd.iterdir()) == ["certs"]

    for bad in (["server"], ["a b"], ["x", "x"]):
        with pytest.raises(certs.CertsError):
            certs.generate(str(tmp_path / "bad"), clients=bad)
    with pytest.raises(certs.CertsError):
        certs.generate(str(tmp_path / "bad"), hosts=["not a host"])
    assert not (tmp_path / "bad").exists()
