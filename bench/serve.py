"""Serving speed of `logitguard serve` beside the library's own `Guard.check`, on 127.0.0.1.

    python bench/serve.py [--count 2000] [--seconds 15] [--concurrency 4] [--batch 4096] [--detector msp]
                          [--overload 100000] [--only c10,d1000,d10000]

Each guard is saved, served by ``logitguard serve`` in a subprocess, and driven by an httpx client
that keeps at most N requests in flight, for a fixed count of requests AND a time limit (whichever
comes first). Request bodies are encoded before the clock starts.

Guards: C=10, the embedded ``ln-reject`` pipeline of data/defenses (learned-noisy detector, K=8 noise
queries per row, rows from the Fashion-MNIST test split); C=1000, a synthetic guard built in memory
(a ``--detector`` detector and a `LogitCorrector` with D=1,000 and D=10,000 trained for one epoch on
synthetic clean and attacked logits, on_flag "correct", K=0; half the rows attacked). Figures:

1. single-row JSON requests at 1, 4 and 16 in flight, without and with dynamic batching
   (``--max-batch-rows 0``, the default / ``4096``): p50 / p99 latency and requests/s (targets at C=1000, D=1,000:
   p99 <= 5 ms at 1 in flight; at 16 in flight, rows/s >= a quarter of in-process batched rows/s);
   beside them GET /v1/health (no work: the floor this machine and client set) and the share of checks
   the server itself answered within 5 ms (from its latency histogram);
2. batched Arrow requests of `--batch` rows, N in flight: rows/s, beside in-process `Guard.check` rows/s
   on the same batches and their ratio (target: HTTP within 2x of in-process, ratio >= 0.5);
3. overload (`--overload` requests, on the C=10 guard and on the D=10,000 one): the server's
   ``--max-concurrency`` set to 8, the client keeps 16 single-row requests in flight (twice the capacity)
   and sends the next at once, 503 or not: the share answered 503, the accepted requests' p50 / p99, and
   the server's resident memory before, after 10% and at the end of the run (it must not grow). The C=10
   guard answers faster than one client on the same cores can send, so only the slow D=10,000 guard
   (a single row reads its 80 MB of weights) holds more than 8 requests at the server.

Client and server share the machine (2 cores here): the client's own CPU time is part of every figure.
Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from logitguard.defenses.corrector import LogitCorrector  # noqa: E402
from logitguard.defenses.gated import GatedDefense  # noqa: E402
from logitguard.defenses.detectors import make_detector  # noqa: E402
from logitguard.defenses.guard import Guard  # noqa: E402
from logitguard.evaluation.guard import guard_from_pipeline
from logitguard.serve.codec import ARROW_STREAM, JSON  # noqa: E402
from logitguard.tables import read_table  # noqa: E402


def synthetic_guard(classes: int, hidden: int, detector: str, rows: int = 4096, seed: int = 0) -> tuple[Guard, np.ndarray]:
    """A C-class guard (detector + corrector of width `hidden`, on_flag correct, K=0) fitted on synthetic
    logits, and 4 * `rows` fresh rows to serve (half clean, half attacked), float32 (N, C)."""
    def logits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = rng.integers(0, classes, n)
        clean = rng.normal(size=(n, classes)).astype(np.float32)
        clean[np.arange(n), labels] += 6.0
        attacked = clean.copy()  # the attack lifts a wrong class just above a lowered true one: low confidence
        attacked[np.arange(n), labels] -= 4.0
        attacked[np.arange(n), (labels + 1 + rng.integers(0, classes - 1, n)) % classes] += 3.0
        return clean, attacked, labels

    rng = np.random.default_rng(seed)
    clean, attacked, labels = logits(rows, rng)
    fitted = make_detector(detector, fpr=0.01).fit(np.concatenate([clean, attacked]),
                                                   np.repeat([False, True], rows))
    corrector = LogitCorrector(hidden=hidden, epochs=1, lr=1e-3, progress=False).fit(clean, attacked, labels)
    guard = Guard(GatedDefense(fitted, corrector, on_flag="correct"), class_names=[f"c{i}" for i in range(classes)])
    serve_clean, serve_attacked, _ = logits(2 * rows, rng)
    return guard, np.concatenate([serve_clean, serve_attacked])[rng.permutation(4 * rows)]


def fashion_guard() -> tuple[Guard, np.ndarray, np.ndarray]:
    """The embedded ln-reject guard and its test rows: logits (N, 10), noise queries (N, 8, 10), float32."""
    guard = guard_from_pipeline(ROOT / "data/defenses/defenses.json", "ln-reject", ROOT / "data/fashion-mnist")
    test = read_table(ROOT / "data/fashion-mnist", split="test")
    order = np.random.default_rng(0).permutation(len(test))
    return guard, test.logits[order], test.noisy_logits[order]


def arrow_body(logits: np.ndarray, noisy: np.ndarray | None) -> bytes:
    """An IPC stream: fixed_size_list<float32>[C] logits and, with noise, fixed_size_list<float32>[K*C] (flat)."""
    columns = {"logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), logits.shape[1])}
    if noisy is not None:
        columns["noisy_logits"] = pa.FixedSizeListArray.from_arrays(pa.array(noisy.ravel()), noisy[0].size)
    batch = pa.record_batch(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def json_body(logits: np.ndarray, noisy: np.ndarray | None) -> bytes:
    body = {"logits": logits.astype(np.float64).tolist()}
    if noisy is not None:
        body["noisy_logits"] = noisy.astype(np.float64).tolist()
    return json.dumps(body).encode()


class Server:
    """``logitguard serve`` on a free loopback port, in a subprocess."""

    def __init__(self, guard: Guard, directory: Path, batch: int, *options: str) -> None:
        path = guard.save(directory / "guard.npz", overwrite=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        code = "import sys; from logitguard.cli import main; sys.argv[0] = 'logitguard'; main()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "serve", str(path), "--port", str(port), "--max-rows", str(batch),
             "--max-body-mb", "512", "--max-concurrency", "64", *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{self.url}/v1/health").raise_for_status()
                return
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {self.process.stderr.read()}") from None
                time.sleep(0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def server_share_within(url: str, seconds: float, before: dict[str, float] | None = None) -> tuple[float, dict]:
    """(share of /v1/check requests the server answered within `seconds` since `before`, the counts now),
    from the service's own latency histogram (the bucket edge must be one of its buckets)."""
    counts = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "logitguard_request_duration_seconds_bucket" and \
                    sample.labels["endpoint"] == "/v1/check" and sample.labels["le"] in (repr(seconds), "+Inf"):
                counts[sample.labels["le"]] = sample.value
    before = before or {}
    within, total = (counts.get(key, 0.0) - before.get(key, 0.0) for key in (repr(seconds), "+Inf"))
    return within / total if total else float("nan"), counts


async def drive(url: str, path: str, bodies: list[bytes], media_type: str, *, count: int, seconds: float,
                concurrency: int, method: str = "POST", busy_ok: bool = False,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, float, int]:
    """Send `count` requests (cycling through `bodies`) with at most `concurrency` in flight, stopping at
    `seconds`; returns (latencies of the 200s in s, wall seconds, 503s). Any other answer stops the run, and
    a 503 too unless `busy_ok`. `progress(sent)` is called before each request."""
    latencies: list[float] = []
    sent = busy = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def send(body: bytes) -> httpx.Response:
            if method == "GET":
                return await client.get(path)
            return await client.post(path, content=body, headers={"content-type": media_type})

        await send(bodies[0])  # warm-up
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal sent, busy
            while sent < count and time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                if progress is not None:
                    progress(sent)
                t0 = time.perf_counter()
                response = await send(body)
                if response.status_code == 503 and busy_ok:
                    busy += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return np.array(latencies), time.perf_counter() - started, busy


def in_process_rows_per_s(guard: Guard, batches: list[tuple[np.ndarray, np.ndarray | None]], seconds: float) -> float:
    """`Guard.check` rows/s cycling through `batches` (after one warm-up call) for about `seconds`."""
    guard.check(*batches[0])
    rows, started, i = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds or i < len(batches):
        logits, noisy = batches[i % len(batches)]
        guard.check(logits, noisy)
        rows += len(logits)
        i += 1
    return rows / (time.perf_counter() - started)


def single_rows(server: Server, single: list[bytes], args: argparse.Namespace, label: str,
                latency_target: float | None) -> dict[int, float]:
    """Single-row JSON at 1, 4 and 16 in flight; returns req/s by requests in flight."""
    rates = {}
    for in_flight in (1, 4, 16):
        _, before = server_share_within(server.url, 0.005)
        lat, wall, _ = asyncio.run(drive(server.url, "/v1/check", single, JSON, count=args.count,
                                         seconds=args.seconds, concurrency=in_flight))
        share, _ = server_share_within(server.url, 0.005, before)
        p50, p99 = np.percentile(lat, [50, 99]) * 1e3
        rates[in_flight] = len(lat) / wall
        target = f"  (target p99 <= {latency_target:g} ms: {'met' if p99 <= latency_target else 'MISSED'})" \
            if latency_target is not None and in_flight == 1 else ""
        print(f"  single-row JSON, {label:>11}, {in_flight:2d} in flight: p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
              f"{rates[in_flight]:6.0f} req/s  [{len(lat)} requests; server-side {100 * share:.1f}% within "
              f"5 ms]{target}")
    return rates


def overload(guard: Guard, single: list[bytes], args: argparse.Namespace, workdir: Path, batching: bool) -> None:
    """Twice the capacity: --max-concurrency 8, 16 in flight, `args.overload` requests."""
    server = Server(guard, workdir, args.batch, "--max-concurrency", "8",
                    "--max-batch-rows", "4096" if batching else "0")
    try:
        rss = {"start": server.rss_mib()}

        def note(sent: int) -> None:
            if sent == args.overload // 10:
                rss["10%"] = server.rss_mib()

        lat, wall, busy = asyncio.run(drive(server.url, "/v1/check", single, JSON, count=args.overload,
                                            seconds=3600, concurrency=16, busy_ok=True, progress=note))
        rss["end"] = server.rss_mib()
    finally:
        server.stop()
    total = len(lat) + busy
    p50, p99 = np.percentile(lat, [50, 99]) * 1e3
    print(f"  overload, --max-concurrency 8, 16 in flight, {'batching' if batching else 'no batching'}, "
          f"{total:,} requests in {wall:.0f} s: "
          f"{100 * busy / total:.1f}% answered 503; accepted p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
          f"{len(lat) / wall:.0f} req/s; server RSS {rss['start']:.0f} MiB at start, "
          f"{rss.get('10%', float('nan')):.0f} after 10%, {rss['end']:.0f} at the end")


def bench(label: str, guard: Guard, logits: np.ndarray, noisy: np.ndarray | None, args: argparse.Namespace,
          workdir: Path, *, latency_target: float | None = None, overload_run: bool = False) -> None:
    print(f"\n{label}: {guard!r}")
    batch = args.batch
    batches = [(logits[i:i + batch], None if noisy is None else noisy[i:i + batch])
               for i in range(0, min(len(logits), 4 * batch) - batch + 1, batch)]
    single = [json_body(logits[i:i + 1], None if noisy is None else noisy[i:i + 1]) for i in range(256)]
    arrow = [arrow_body(*b) for b in batches]
    server = Server(guard, workdir, batch, "--max-batch-rows", "0")
    try:
        floor = asyncio.run(drive(server.url, "/v1/health", [b""], JSON, count=args.count, seconds=args.seconds,
                                  concurrency=1, method="GET"))[0]
        print(f"  transport floor, GET /v1/health, 1 in flight: p50 {np.median(floor) * 1e3:6.2f} ms  "
              f"p99 {np.percentile(floor, 99) * 1e3:6.2f} ms  (no work: what this machine and client cost)")
        single_rows(server, single, args, "no batching", latency_target)
    finally:
        server.stop()
    server = Server(guard, workdir, batch, "--max-batch-rows", "4096")
    try:
        batched = single_rows(server, single, args, "batching", latency_target)
        lat, wall, _ = asyncio.run(drive(server.url, "/v1/check.arrow", arrow, ARROW_STREAM,
                                         count=max(args.count // 20, 8), seconds=args.seconds,
                                         concurrency=args.concurrency))
    finally:
        server.stop()
    http = len(lat) * batch / wall
    local = in_process_rows_per_s(guard, batches, min(args.seconds, 5.0))
    ratio = http / local
    print(f"  batched Arrow, {batch} rows, {args.concurrency} in flight: {http:10,.0f} rows/s  "
          f"(p50 {np.median(lat) * 1e3:.1f} ms/request, {len(lat)} requests)")
    print(f"  in-process Guard.check, same batches:   {local:10,.0f} rows/s")
    print(f"  ratio HTTP / in-process: {ratio:.2f}   (target >= 0.5: {'met' if ratio >= 0.5 else 'MISSED'})")
    quarter = batched[16] / local
    target = f"   (target >= 0.25: {'met' if quarter >= 0.25 else 'MISSED'})" if latency_target is not None else ""
    print(f"  single rows at 16 in flight with batching / in-process batched rows/s: {quarter:.3f}{target}")
    if args.overload and overload_run:
        for batching in (False, True):
            overload(guard, single, args, workdir, batching)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="Requests per single-row run (batched: count/20).")
    parser.add_argument("--seconds", type=float, default=15.0, help="Time limit per run.")
    parser.add_argument("--concurrency", type=int, default=4, help="Requests in flight (N).")
    parser.add_argument("--batch", type=int, default=4096, help="Rows per Arrow request.")
    parser.add_argument("--detector", default="msp", choices=["msp", "learned"], help="Detector of the C=1000 guards.")
    parser.add_argument("--overload", type=int, default=100_000, help="Requests of the overload run (0: none).")
    parser.add_argument("--only", default="c10,d1000,d10000", help="Guards to run: c10, d1000, d10000.")
    args = parser.parse_args()
    only = set(args.only.split(","))
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; client and server on 127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "c10" in only:
            guard, logits, noisy = fashion_guard()
            bench("C=10, embedded ln-reject (K=8)", guard, logits, noisy, args, workdir, overload_run=True)
        for hidden in [h for h in (1000, 10_000) if f"d{h}" in only]:
            guard, logits = synthetic_guard(1000, hidden, args.detector)
            bench(f"C=1000, D={hidden:,}, synthetic", guard, logits, None, args, workdir,
                  latency_target=5.0 if hidden == 1000 else None, overload_run=hidden == 10_000)


if __name__ == "__main__":
    main()
