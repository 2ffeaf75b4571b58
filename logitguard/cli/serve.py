"""The `serve` command: a guard over HTTP (the 'serve' extra)."""

from __future__ import annotations

from typing import Any

import click

from ..errors import LogitguardError
# These import nothing else: `--help` stays cheap and works without the 'serve' extra.
from ..serve import (DEFAULT_BATCH_DELAY, DEFAULT_BODY_TIMEOUT, DEFAULT_COMPUTE_THREADS, DEFAULT_DRAIN_TIMEOUT, DEFAULT_DRIFT_WINDOW,
                     DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_BODY_BYTES,
                     DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_ROWS, TOKEN_ENV)
from .options import main

# What the 'serve' extra installs: an ImportError naming one of these means the extra is missing.
_SERVE_MODULES = {"fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client"}


@main.command()
@click.argument("guard", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Beyond loopback a token is required (or --no-auth).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help=f"File whose first line is the bearer token every route but the health probes requires (mode "
                   f"600). Default: ${TOKEN_ENV}, if set.")
@click.option("--no-auth", is_flag=True, help="Serve beyond loopback without a token (a proxy in front "
                                              "authenticates).")
@click.option("--max-rows", type=click.IntRange(min=1), default=DEFAULT_MAX_ROWS, show_default=True,
              help="Rows per request (more: 422).")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MAX_BODY_BYTES / 2**20,
              show_default=True, help="Request body limit in MiB (more: 413).")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=DEFAULT_MAX_CONCURRENCY, show_default=True,
              help="Requests in flight at most; more are answered 503 with Retry-After at once.")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_HEADER_TIMEOUT,
              show_default=True, help="Seconds a connection has to send a request head.")
@click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_BODY_TIMEOUT,
              show_default=True, help="Seconds a request has to send its body (more: 408).")
@click.option("--idle-timeout", type=click.FloatRange(min=1), default=DEFAULT_IDLE_TIMEOUT, show_default=True,
              help="Seconds a kept-alive connection may wait for its next request.")
@click.option("--drain-timeout", type=click.FloatRange(min=1), default=DEFAULT_DRAIN_TIMEOUT, show_default=True,
              help="On SIGTERM, seconds to finish the requests in flight before exiting.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Host header name to accept (repeat for several). Default: localhost names when bound to "
                   "loopback, any otherwise.")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PEM certificate: serve HTTPS (with --ssl-keyfile).")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None, help="Its PEM key.")
@click.option("--max-batch-rows", type=click.IntRange(min=0), default=DEFAULT_MAX_BATCH_ROWS, show_default=True,
              help="Dynamic batching: concurrent requests' rows decided in one call, up to this many (0: off; "
                   "try 4096 where one check is slow, as with a wide corrector).")
@click.option("--batch-delay-ms", type=click.FloatRange(min=0), default=DEFAULT_BATCH_DELAY * 1000, show_default=True,
              help="Milliseconds a batch waits for more requests (0: it takes what arrived while the last one ran).")
@click.option("--compute-threads", type=click.IntRange(min=1), default=DEFAULT_COMPUTE_THREADS, show_default=True,
              help="BLAS / OpenMP threads a check may use. Requests already run in parallel; raise it for few, "
                   "large batches.")
@click.option("--watch-table", type=click.Path(exists=True), default=None,
              help="Campaign watch: calibrate it on this table's clean rows (train split, else all), and watch each "
                   "client address's logit stream for a query attack (alarms in /v1/info and /metrics).")
@click.option("--watch-threshold", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Campaign watch with this k-NN distance threshold instead of calibrating one.")
@click.option("--watch-block", is_flag=True, help="Answer 429 to a client whose stream is in alarm.")
@click.option("--watch-memory-mb", type=click.FloatRange(min=1), default=256, show_default=True,
              help="Memory the campaign watch may hold; sets how many clients it tracks.")
@click.option("--docs", is_flag=True, help="Serve the browsable API page at /docs (loads its scripts from a CDN).")
@click.option("--drift-window", type=click.IntRange(min=1), default=DEFAULT_DRIFT_WINDOW, show_default=True,
              help="Recent rows whose flagged rate is tested against the detector's calibrated FPR.")
def serve(guard: str, host: str, token_file: str | None, no_auth: bool, max_body_mb: float, batch_delay_ms: float,
          allowed_hosts: tuple[str, ...], watch_table: str | None, watch_threshold: float | None, watch_block: bool,
          watch_memory_mb: float, **options: Any) -> None:
    """Serve GUARD (a guard file) over HTTP: POST /v1/check (JSON), /v1/check.arrow (Arrow IPC stream);
    GET /v1/health, /v1/info, /metrics, /openapi.json; and the Open Inference Protocol (KServe v2, Triton's
    clients) under /v2, model 'logitguard'."""
    try:
        from ..serve import is_loopback, read_token, run
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in _SERVE_MODULES:
            raise LogitguardError("the service needs the 'serve' extra: pip install 'logitguard[serve]' "
                                  f"({exc.name} is missing)") from None
        raise
    from ..defenses.guard import Guard

    loaded = Guard.load(guard)
    token = read_token(token_file)
    campaign = campaign_watch(loaded.num_classes, watch_table, watch_threshold, watch_memory_mb)
    if watch_block and campaign is None:
        raise click.UsageError("--watch-block needs a campaign watch: --watch-table or --watch-threshold")
    if token is None and no_auth and not is_loopback(host):
        click.echo(f"warning: serving on {host} without authentication (--no-auth): anyone who reaches it can "
                   "query the guard", err=True)
    if not allowed_hosts and is_loopback(host):
        allowed_hosts = ("localhost", "127.0.0.1", "[::1]")
    run(loaded, host=host, campaign=campaign, campaign_block=watch_block, token=token, no_auth=no_auth, max_body_bytes=max(1, int(max_body_mb * 2**20)),
        allowed_hosts=allowed_hosts or None, batch_delay=batch_delay_ms / 1000, **options)


def campaign_watch(num_classes: int, table: str | None, threshold: float | None, memory_mb: float) -> Any:
    """The `CampaignWatch` the options ask for (None without --watch-table or --watch-threshold); it tracks as
    many clients as `memory_mb` holds at the default window."""
    if table is None and threshold is None:
        return None
    if table is not None and threshold is not None:
        raise click.UsageError("give --watch-table or --watch-threshold, not both")
    from ..serve.campaign import CampaignWatch, client_bytes

    params = {"max_clients": max(1, int(memory_mb * 2**20 // client_bytes(num_classes)))}
    if threshold is not None:
        return CampaignWatch(threshold, **params)
    from ..tables import CLEAN, read_table

    rows = read_table(table, attacks=CLEAN)
    if "train" in rows.splits:
        rows = rows.select(split="train")
    if rows.num_classes != num_classes:
        raise LogitguardError(f"--watch-table has {rows.num_classes} classes; the guard has {num_classes}")
    return CampaignWatch.calibrate(rows.logits, **params)
