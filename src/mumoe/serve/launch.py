"""Start `mumoe serve` as a subprocess on a free local port and wait until it answers (for scripts, notebooks,
benchmarks and tests)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from ..errors import MumoeError


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(args: list[str], timeout: float = 120.0, env: dict | None = None, stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT) -> tuple[subprocess.Popen, str]:
    """`python -m mumoe serve ARGS --port P` on a free port; returns (process, "http://127.0.0.1:P") once
    GET /health answers. A server that exits or does not answer within `timeout` s is a MumoeError (with its
    output when it was captured)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mumoe", "serve", *args, "--port", str(port)], stdout=stdout,
                            stderr=stderr, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise MumoeError(f"mumoe serve exited with {proc.returncode}: {out.strip().splitlines()[-1:] or ''}")
        time.sleep(0.1)
    proc.kill()
    raise MumoeError(f"mumoe serve did not answer on {url} within {timeout:g} s")
