"""`podbroker serve` and `podbroker gc`."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli.tls import ReloadingTLSContext
from broker.errors import BrokerError
from broker.logs import LogFormat, configure_logging

if TYPE_CHECKING:
    import uvicorn

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Broker settings (YAML); PODBROKER_* env vars override.",
        exists=True,
        dir_okay=False,
    ),
]


def _load(config: Path | None):  # type: ignore[no-untyped-def]
    from broker.settings import load_settings

    try:
        return load_settings(config)
    except BrokerError as exc:
        typer.echo(f"error: {exc.reason}", err=True)
        raise typer.Exit(2) from exc


def serve(
    config: ConfigOption = None,
    dev_generate_key: Annotated[
        bool, typer.Option(help="Create the audit signing key if missing (development only).")
    ] = False,
    log_format: Annotated[
        LogFormat | None,
        typer.Option(
            "--log-format",
            help="text (default) or json: one JSON object per line. Overrides logging.format.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the broker's HTTP API with its pod watcher and reconciler."""
    import uvicorn

    from broker.api.app import create_app
    from broker.service.runtime import build_runtime

    configure_logging(log_format or "text")
    settings = _load(config)
    if log_format is None:
        configure_logging(settings.logging.format)
    try:
        runtime = build_runtime(settings, dev_generate_key=dev_generate_key)
    except BrokerError as exc:
        typer.echo(f"error: cannot start: {exc.reason}", err=True)
        raise typer.Exit(1) from exc
    runtime.start_background()
    server = settings.server
    metrics_server = _start_metrics_listener(server.host, server.metrics_port)
    try:
        api = uvicorn.Config(
            create_app(runtime),
            host=server.host,
            port=server.port,
            log_level="info",
            log_config=None,  # uvicorn's loggers go through configure_logging's handler
            access_log=True,
            # Longer than a client's pooled connection idles between a burst's requests:
            # at uvicorn's 5 s a connection was closed just as the client reused it.
            timeout_keep_alive=30,
        )
        api.load()
        if server.tls_cert_file and server.tls_key_file:
            # Re-reads the certificate when its files change (cert-manager rotation).
            api.ssl = ReloadingTLSContext(server.tls_cert_file, server.tls_key_file).context
        uvicorn.Server(api).run()
    finally:
        if metrics_server is not None:
            metrics_server.should_exit = True
        runtime.close()


def _start_metrics_listener(host: str, port: int | None) -> uvicorn.Server | None:
    """``server.metrics_port``: a plain-HTTP listener serving only ``GET /metrics``, in a
    daemon thread (uvicorn handles signals only in the main thread, i.e. the API's)."""
    if port is None:
        return None
    import uvicorn
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False)
    metrics_server = uvicorn.Server(config)
    threading.Thread(target=metrics_server.run, name="metrics-listener", daemon=True).start()
    return metrics_server


def gc(config: ConfigOption = None) -> None:
    """Run one reconcile pass: clean up Secrets and pods left by crashes or retention."""
    from broker.service.runtime import build_runtime

    settings = _load(config)
    try:
        runtime = build_runtime(settings)
    except BrokerError as exc:
        typer.echo(f"error: cannot start: {exc.reason}", err=True)
        raise typer.Exit(1) from exc
    try:
        result = runtime.reconciler.sweep()
    finally:
        runtime.close()
    typer.echo(f"secrets cleaned after pod end: {result.secrets_cleaned}")
    typer.echo(f"orphan secrets deleted:        {result.orphan_secrets_deleted}")
    typer.echo(f"pods without secret deleted:   {result.orphan_pods_deleted}")
    typer.echo(f"retained pods deleted:         {result.expired_pods_deleted}")
    for error in result.errors:
        typer.echo(f"error: {error}", err=True)
    if result.errors:
        raise typer.Exit(1)
