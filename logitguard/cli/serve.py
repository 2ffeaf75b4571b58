"""The `serve` command: a guard over HTTP (the 'serve' extra)."""

from __future__ import annotations

import click

from ..errors import LogitguardError
from ..serve import DEFAULT_DRIFT_WINDOW, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_ROWS  # imports nothing else
from .options import main

# What the 'serve' extra installs: an ImportError naming one of these means the extra is missing.
_SERVE_MODULES = {"fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client"}


@main.command()
@click.argument("guard", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback by default: the service has no authentication of its own.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-rows", type=click.IntRange(min=1), default=DEFAULT_MAX_ROWS, show_default=True,
              help="Rows per request (more: 422).")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MAX_BODY_BYTES / 2**20,
              show_default=True, help="Request body limit in MiB (more: 413).")
@click.option("--drift-window", type=click.IntRange(min=1), default=DEFAULT_DRIFT_WINDOW, show_default=True,
              help="Recent rows whose flagged rate is tested against the detector's calibrated FPR.")
def serve(guard: str, host: str, port: int, max_rows: int, max_body_mb: float, drift_window: int) -> None:
    """Serve GUARD (a guard file) over HTTP: POST /v1/check (JSON), /v1/check.arrow (Arrow IPC stream);
    GET /v1/health, /v1/info, /metrics, /openapi.json."""
    try:
        from ..serve import is_loopback, run
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in _SERVE_MODULES:
            raise LogitguardError("the service needs the 'serve' extra: pip install 'logitguard[serve]' "
                                  f"({exc.name} is missing)") from None
        raise
    from ..defenses.guard import Guard

    loaded = Guard.load(guard)
    if not is_loopback(host):
        click.echo(f"warning: binding to {host} lets other machines reach this service, which has no "
                   "authentication; put it behind a proxy that authenticates, or bind to 127.0.0.1", err=True)
    run(loaded, host=host, port=port, max_rows=max_rows, max_body_bytes=max(1, int(max_body_mb * 2**20)),
        drift_window=drift_window)
