"""The service on an untrusted network: each fault an independent battery of hostile requests found, against
the real uvicorn server (in a thread, or `logitguard serve` in a subprocess for signals).

Token authentication (401, open probes), the in-flight limit (503 + Retry-After), header and body deadlines,
request framing (Content-Length with Transfer-Encoding), Host checks, no slash redirect, JSON bodies refused
on their number count before they are parsed (memory bounded by the limits), client hang-ups counted as 499,
no echo of large keys, no paths or versions to callers without a token, docs off, a graceful drain on SIGTERM.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from logitguard.cli import main
from logitguard.errors import LogitguardError
from logitguard.evaluation.guard import fit_guard
from logitguard.serve import create_app, read_token, run, serve_in_thread

TOKEN = "s3cret-token-for-tests-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guard(digits_split_table):
    """MSP detector at 1% FPR, reject: C = 10, no noise queries."""
    return fit_guard(digits_split_table, detector="msp")


@pytest.fixture(scope="module")
def rows(digits_split_table):
    return digits_split_table.select(split="test").logits[:5]


@contextmanager
def served(guard, *, deadlines=None, **options):
    with serve_in_thread(create_app(guard, **options), **(deadlines or {})) as url:
        yield url


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def raw(url: str, data: bytes, *, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(address(url), timeout=timeout)
    sock.sendall(data)
    return sock


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def head(body_length: int, path: str = "/v1/check", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_length}\r\n{extra}\r\n").encode()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- authentication ------------------------------------------------------------------------------


def test_a_token_guards_every_route_but_the_probes(guard, rows):
    with served(guard, token=TOKEN) as url, httpx.Client(base_url=url) as client:
        body = {"logits": rows.tolist()}
        for method, path in (("POST", "/v1/check"), ("GET", "/v1/info"), ("GET", "/metrics"),
                             ("GET", "/openapi.json")):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
                answer = client.request(method, path, json=body if method == "POST" else None, headers=headers)
                assert answer.status_code == 401, (path, headers)
                assert answer.json() == {"detail": "unauthorized"}  # the same answer, whatever was wrong
                assert answer.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/health").json() == {"status": "ok"}
        good = client.post("/v1/check", json=body, headers=AUTH)
        assert good.status_code == 200
        assert [r["model_label"] for r in good.json()["results"]] == guard.check(rows).model_label.tolist()
        info = client.get("/v1/info", headers=AUTH).json()
        assert info["server"]["authentication"] == "bearer" and "version" in info["server"]
        assert client.get("/metrics", headers=AUTH).status_code == 200


def test_binding_beyond_loopback_needs_a_token_or_an_explicit_waiver(guard, tmp_path, monkeypatch):
    with pytest.raises(LogitguardError, match="exposes the guard to other machines"):
        run(guard, host="0.0.0.0", port=0)
    path = guard.save(tmp_path / "guard.npz")
    monkeypatch.delenv("LOGITGUARD_TOKEN", raising=False)
    refused = CliRunner().invoke(main, ["serve", str(path), "--host", "0.0.0.0"])
    assert refused.exit_code == 1 and "Error: binding to 0.0.0.0 exposes the guard" in refused.output


def test_run_caps_the_blas_threads_of_its_process(guard, monkeypatch):
    """`run` owns its process: a check's arithmetic gets `compute_threads` BLAS / OpenMP threads."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setattr("uvicorn.Server.run", lambda self: None)  # configure, do not serve
    with threadpoolctl.threadpool_limits(limits=None):  # restores the suite's own limits afterwards
        run(guard, port=0, compute_threads=1)
        pools = threadpoolctl.threadpool_info()
        assert pools and all(pool["num_threads"] == 1 for pool in pools)


def test_tokens_are_read_safely(tmp_path, monkeypatch):
    monkeypatch.delenv("LOGITGUARD_TOKEN", raising=False)
    assert read_token() is None
    file = tmp_path / "token"
    file.write_text(TOKEN + "\n")
    file.chmod(0o644)
    with pytest.raises(LogitguardError, match="readable by other users"):
        read_token(file)
    file.chmod(0o600)
    assert read_token(file) == TOKEN
    file.write_text("short\n")
    with pytest.raises(LogitguardError, match="at least 16"):
        read_token(file)
    monkeypatch.setenv("LOGITGUARD_TOKEN", f"  {TOKEN} ")
    assert read_token() == TOKEN


# -- overload and deadlines ------------------------------------------------------------------------


def test_requests_beyond_the_concurrency_limit_get_503_at_once(guard, rows):
    body = json.dumps({"logits": rows.tolist()}).encode()
    with served(guard, max_concurrency=1) as url, httpx.Client(base_url=url) as client:
        held = raw(url, head(len(body)) + body[:10])  # in flight until its body ends
        time.sleep(0.3)
        started = time.perf_counter()
        busy = client.post("/v1/check", json={"logits": rows.tolist()})
        assert busy.status_code == 503 and time.perf_counter() - started < 1.0
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
        assert client.get("/v1/health").status_code == 200  # probes are not counted
        held.sendall(body[10:])
        assert read_all(held).startswith(b"HTTP/1.1 200")
        assert client.post("/v1/check", json={"logits": rows.tolist()}).status_code == 200


def test_a_slow_body_gets_408_and_a_silent_connection_is_closed(guard):
    deadlines = {"header_timeout": 0.5}
    with served(guard, body_timeout=0.5, deadlines=deadlines) as url:
        slow = raw(url, head(100) + b'{"logits": ')
        started = time.perf_counter()
        answer = read_all(slow)
        assert answer.startswith(b"HTTP/1.1 408") and time.perf_counter() - started < 5
        for partial in (b"", b"POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\n"):  # silent; a head never finished
            sock = raw(url, partial)
            started = time.perf_counter()
            assert read_all(sock) == b"" and 0.3 < time.perf_counter() - started < 5


def test_a_client_that_hangs_up_is_counted_as_499_not_as_a_server_error(guard, caplog):
    with served(guard) as url:
        sock = raw(url, head(1000) + b'{"logits": [[1')
        time.sleep(0.2)
        sock.close()
        time.sleep(0.5)
        text = httpx.get(f"{url}/metrics").text
    assert 'logitguard_requests_total{endpoint="/v1/check",status="499"} 1.0' in text
    assert 'status="500"' not in text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


# -- framing, hosts, redirects, echoes --------------------------------------------------------------


def test_content_length_with_transfer_encoding_is_refused(guard):
    with served(guard) as url:
        sock = raw(url, head(5, extra="Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding" in answer


def test_unknown_hosts_are_refused_and_nothing_redirects(guard):
    with served(guard, allowed_hosts=["localhost", "127.0.0.1"]) as url, httpx.Client(base_url=url) as client:
        assert client.get("/v1/health").status_code == 200
        evil = client.get("/v1/health", headers={"host": "attacker.example"})
        assert evil.status_code == 400 and evil.json() == {"detail": "unexpected Host header"}
        slash = client.get("/v1/health/", follow_redirects=False)
        assert slash.status_code == 404 and "location" not in slash.headers
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_error_messages_do_not_echo_large_keys(guard, rows):
    with served(guard) as url:
        answer = httpx.post(f"{url}/v1/check", json={"logits": rows.tolist(), "k" * 1_000_000: 1})
    assert answer.status_code == 422 and len(answer.text) < 400 and "\n" not in answer.text


# -- memory bounded by the limits ------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    pytest.param(lambda: b'{"logits": [' + b"[0]," * 3_000_000 + b"[0]]}", id="3M tiny rows"),
    pytest.param(lambda: b'{"logits": [[' + b"0," * 10_000_000 + b"0]]}", id="one row of 10M values"),
])
def test_json_bombs_under_the_body_limit_are_refused_before_parsing(guard, body):
    data = body()
    with served(guard) as url:
        before, started = rss_mib(), time.perf_counter()
        answer = httpx.post(f"{url}/v1/check", content=data, headers={"content-type": "application/json"},
                            timeout=60)
        took, grown = time.perf_counter() - started, rss_mib() - before
    assert answer.status_code == 422 and "more numbers than this server takes" in answer.json()["detail"]
    assert took < 5, took
    assert grown < 3 * len(data) / 2**20 + 50, grown  # the body and a copy, not a parsed object per number


# -- what callers without a token see -----------------------------------------------------------------


def test_info_shows_no_directory_and_no_versions_without_a_token(digits_split_table, tmp_path):
    from logitguard.tables import write_table

    table = tmp_path / "secret-dir" / "digits.parquet"
    write_table(digits_split_table, table)
    guard = fit_guard(str(table), detector="msp")
    with served(guard) as url:
        text = httpx.get(f"{url}/v1/info").text
        spec = httpx.get(f"{url}/openapi.json").json()
    assert str(tmp_path) not in text and "secret-dir" not in text and "digits.parquet" in text
    info = json.loads(text)
    assert "version" not in info["server"] and "numpy" not in info["provenance"]
    assert spec["info"]["version"] == "withheld"


# -- a graceful drain --------------------------------------------------------------------------------


def test_sigterm_drains_and_exits_even_with_a_stalled_client(guard, rows, tmp_path):
    path = guard.save(tmp_path / "guard.npz")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from logitguard.cli import main; sys.argv[0] = 'logitguard'; main()"
    process = subprocess.Popen([sys.executable, "-c", code, "serve", str(path), "--port", str(port),
                                "--drain-timeout", "2", "--body-timeout", "60"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/v1/health")
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
                time.sleep(0.2)
        stalled = raw(url, head(1000) + b'{"logits": ')  # never finishes its body
        time.sleep(0.3)
        started = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        assert time.perf_counter() - started < 8
        stalled.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
