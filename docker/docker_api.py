"""A minimal Docker Engine API client over the unix socket (standard library only).

    api = DockerAPI("/var/run/docker.sock")
    api.containers({"com.docker.compose.service": "peer"})   # -> [{"Id", "Names", "State", ...}]
    api.post(cid, "stop", t=30); api.post(cid, "start")

One HTTP/1.1 request per connection (``http.client`` over an AF_UNIX socket). A refusal becomes
:class:`DockerError` with the engine's message.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Dict, List, Optional

OK_NOT_MODIFIED = 304  # start of a running container, stop of a stopped one


class DockerError(RuntimeError):
    """The engine refused a request, or could not be reached. One line."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def socket_path(docker_host: str) -> str:
    """``unix:///var/run/docker.sock`` (or a bare path) -> the socket's path; DockerError otherwise."""
    if docker_host.startswith("unix://"):
        return docker_host[len("unix://") :]
    if docker_host.startswith("/"):
        return docker_host
    raise DockerError(
        f"DOCKER_HOST={docker_host!r} is not allowed: unix:///path/to/docker.sock "
        "(the chaos service talks to the engine's unix socket only)"
    )


class DockerAPI:
    def __init__(self, path: str, version: str = "1.41", timeout: float = 60.0):
        self.path, self.prefix, self.timeout = path, f"/v{version}" if version else "", timeout

    def request(self, method: str, path: str, query: Optional[dict] = None, timeout: Optional[float] = None):
        """(status, decoded JSON body or None)."""
        url = self.prefix + path + ("?" + urllib.parse.urlencode(query) if query else "")
        conn = _UnixConnection(self.path, timeout or self.timeout)
        try:
            conn.request(
                method,
                url,
                headers={"Host": "docker", "Content-Length": "0"} if method == "POST" else {"Host": "docker"},
            )
            resp = conn.getresponse()
            body = resp.read()
        except OSError as e:
            raise DockerError(f"{method} {url}: the engine at {self.path} cannot be reached: {e}") from None
        finally:
            conn.close()
        data = None
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                data = body.decode("utf-8", "replace")
        if resp.status >= 400:
            msg = data.get("message") if isinstance(data, dict) else data
            raise DockerError(f"{method} {url}: {resp.status} {msg}")
        return resp.status, data

    def containers(self, labels: Dict[str, str]) -> List[dict]:
        """Every container (running or not) carrying all these labels."""
        filters = json.dumps({"label": [f"{k}={v}" for k, v in sorted(labels.items())]})
        _, data = self.request("GET", "/containers/json", {"all": "1", "filters": filters})
        return list(data or [])

    def inspect(self, cid: str) -> dict:
        _, data = self.request("GET", f"/containers/{urllib.parse.quote(cid)}/json")
        return data or {}

    def post(self, cid: str, action: str, **query) -> int:
        """POST /containers/{id}/{action} (start, stop, kill, pause, unpause, restart); the status code."""
        # stop waits up to t seconds for the container to exit: give the socket longer than that
        timeout = float(query.get("t", 0)) + self.timeout
        status, _ = self.request(
            "POST", f"/containers/{urllib.parse.quote(cid)}/{action}", query or None, timeout=timeout
        )
        return status
