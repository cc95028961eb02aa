"""Reading and showing a coordinator's status (behind ``dtrain-status``).

:func:`fetch_status` calls the Coordinator's Status RPC and turns every
failure into a :class:`StatusError` whose one-line message names the address
and the problem (unreachable, TLS, token, deadline). :func:`status_dict` is
the reply as plain data (the ``json=true`` output); :func:`render` lays it
out as a header line plus the members and last-commits tables.
"""

from __future__ import annotations

import datetime as dt
import json
import re

import grpc

from ..errors import one_line
from ..obs.table import format_table
from ..v1 import dtrain_pb2 as pb
from ..v1 import dtrain_pb2_grpc as pb_grpc
from ..wire.auth import auth_metadata, make_channel

HASH_PREFIX = 12
_TLS_WORDS = re.compile(r"ssl|tls|handshake|certificate|x509|alpn|verification|wrong version number", re.I)


class StatusError(RuntimeError):
    """The Status call failed; the message is one line naming the address."""


def _core_reason(details: str) -> str:
    """gRPC's connect error minus its boilerplate ('failed to connect ...; last error: UNKNOWN: ipv4:H:P: ')."""
    m = re.search(r"last error: [A-Z_]+: (?:(?:ipv4|ipv6|unix):\S+?: )?(.*)$", details)
    reason = m.group(1) if m else details
    return re.sub(r": OK$", "", reason)


def describe_rpc_error(address: str, err: grpc.RpcError, tls_on: bool, timeout_s: float) -> str:
    """One line saying what went wrong talking to the coordinator at ``address``."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = _core_reason(one_line(err.details() if hasattr(err, "details") else err)) or code.name
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"coordinator at {address} refused the token ({details}): "
            "set auth.token=... or DTRAIN_TOKEN to the run's token (or the status tool's identity token)"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"coordinator at {address} did not answer within {timeout_s:g}s (timeout_s=...)"
    if code == grpc.StatusCode.UNAVAILABLE:
        if _TLS_WORDS.search(details):
            hint = (
                "check tls.ca (the CA that signed the server certificate), tls.server_name, and "
                "tls.cert/tls.key when the coordinator requires client certificates"
            )
            return f"TLS with coordinator at {address} failed ({details}): {hint}"
        hint = "is it running, is the address right"
        hint += (
            ", does it serve TLS, does it require a client certificate (tls.cert/tls.key)?"
            if tls_on
            else ", does it require TLS (tls.ca=...)?"
        )
        return f"cannot reach coordinator at {address} ({details}): {hint}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{address} does not serve the dtrain Coordinator service ({details})"
    return f"Status call to coordinator at {address} failed: {code.name}: {details}"


def fetch_status(
    address: str, tls=None, token: str = "", timeout_s: float = 5.0, max_message_bytes: int = 64 * 2**20
) -> pb.StatusReply:
    """The coordinator's StatusReply; StatusError (one line) on any failure."""
    try:
        channel = make_channel(address, tls, max_message_bytes)
    except ValueError as e:  # unreadable TLS files
        raise StatusError(f"cannot connect to coordinator at {address}: {one_line(e)}") from None
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        return stub.Status(pb.StatusRequest(), timeout=timeout_s, metadata=auth_metadata(token))
    except grpc.RpcError as e:
        tls_on = tls is not None and tls.client_enabled
        raise StatusError(describe_rpc_error(address, e, tls_on, timeout_s)) from None
    finally:
        channel.close()


def _iso(unix_ms: int) -> str:
    return dt.datetime.fromtimestamp(unix_ms / 1000.0, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def status_dict(r: pb.StatusReply, address: str = "") -> dict:
    """The reply as JSON-ready data (full hashes; times as unix ms and ISO-8601 UTC)."""
    return {
        "coordinator": address,
        "committed_round": r.committed_round,
        "quorum_id": r.quorum_id,
        "phase": r.phase,
        "min_peers": r.min_peers,
        "schema_hash": r.schema_hash,
        "lease_timeout_ms": r.lease_timeout_ms,
        "members": [
            {
                "peer_id": m.peer_id,
                "address": m.address,
                "region": m.region,
                "world_size": m.world_size,
                "state": m.state,
                "round": m.round,
                "lease_age_ms": m.lease_age_ms,
                "state_hash": m.state_hash,
                "contribution": (
                    {"round": m.contribution_round, "norm": m.contribution_norm, "clip": m.clip}
                    if m.has_contribution
                    else None
                ),
            }
            for m in r.members
        ],
        "commits": [
            {
                "round": c.round,
                "quorum_id": c.quorum_id,
                "members": list(c.members),
                "state_hash": c.state_hash,
                "unix_ms": c.unix_ms,
                "time": _iso(c.unix_ms),
            }
            for c in r.commits
        ],
    }


def _contribution_columns(c) -> list:
    """Who moved the model: the norm of a member's last committed contribution (and its round), the factor
    the bounded mean scaled it by."""
    if not c:
        return ["-", "-"]
    return [f"{c['norm']:.3g} ({c['round']})", f"{c['clip']:.3g}"]


def _hash_column(h: str) -> str:
    return h[:HASH_PREFIX] if h else "-"


def render(d: dict) -> str:
    """Header line, members table, last-commits table (from :func:`status_dict`)."""
    where = f"coordinator {d['coordinator']} | " if d.get("coordinator") else ""
    header = (
        f"{where}committed round {d['committed_round']} | quorum {d['quorum_id']} | "
        f"phase {d['phase'] or '-'} | min_peers {d['min_peers']} | schema {_hash_column(d['schema_hash'])}"
    )
    # numbers go in as strings: format_table would abbreviate large ints (12345 -> 12.35k)
    members = [
        [
            m["peer_id"],
            m["address"],
            m["region"] or "-",
            str(m["world_size"]),
            m["state"],
            str(m["round"]),
            f"{m['lease_age_ms'] / 1000:.1f}",
            *_contribution_columns(m.get("contribution")),
        ]
        for m in d["members"]
    ]
    commits = [
        [str(c["round"]), str(c["quorum_id"]), ",".join(c["members"]), _hash_column(c["state_hash"]), c["time"]]
        for c in d["commits"]
    ]
    parts = [header, ""]
    if members:
        parts.append(
            format_table(
                ["id", "address", "region", "world size", "state", "round", "lease age (s)", "|Δ| (round)", "clip"],
                members,
                title=f"members ({len(members)})",
            )
        )
    else:
        parts.append("members (0): none")
    parts.append("")
    if commits:
        parts.append(
            format_table(
                ["round", "quorum id", "members", "state hash", "time (UTC)"],
                commits,
                title=f"last commits ({len(commits)}, newest last)",
            )
        )
    else:
        parts.append("last commits: none yet")
    return "\n".join(parts)


def show(address: str, tls=None, token: str = "", timeout_s: float = 5.0, as_json: bool = False) -> str:
    """What ``dtrain-status`` prints: the tables, or one JSON object; StatusError on failure."""
    d = status_dict(fetch_status(address, tls, token, timeout_s), address)
    return json.dumps(d) if as_json else render(d)
