"""The app factory: ``create_app(settings)`` builds the FastAPI app and everything it shares."""

from __future__ import annotations

import gc
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitor.measures import PluginRegistry, load_plugins
from monitor.service.ingest import Ingestor, Processed
from monitor.service.metrics import ServiceMetrics
from monitor.service.routes import health, ingest, plugins, results, runs
from monitor.service.state import Services, TokenCache
from monitor.service.webhooks import WebhookSender, webhook_body
from monitor.settings import Settings
from monitor.sinks.mlflow_async import AsyncMlflowSink
from monitor.store import NotFound, StoreError, make_engine, require_current_schema
from monitor.store.store import SqlStore

logger = logging.getLogger(__name__)

API_VERSION = "v1"


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: pass the request on with its body counted."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        if declared is None:
            # A chunked body: read it whole first, so that one over the limit gets a clear 413
            # (refusing half-way through the parse would come out as a vague 400).
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    await self._refuse(scope, receive, send)
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

            await self.app(scope, replay, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body is larger than the service accepts ({self.limit} bytes)"
        response = JSONResponse({"detail": detail}, status.HTTP_413_CONTENT_TOO_LARGE)
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def _after_commit(svc_ref: dict[str, Services]) -> object:
    """The listener that hands committed results to metrics, webhooks and MLflow."""

    def listener(processed: Processed) -> None:
        svc = svc_ref["services"]
        svc.metrics.site_summaries.inc(processed.site_summaries)
        svc.metrics.step_summaries.inc(processed.step_summaries)
        for _, outcome in processed.outcomes:
            for plugin, _ in outcome.errors:
                svc.metrics.plugin_errors.labels(plugin).inc()
        alerts = processed.alerts
        if alerts:
            run = svc.store.run(processed.run_id)
            for alert in alerts:
                svc.metrics.alerts.labels(alert.kind).inc()
                svc.webhooks.send(webhook_body(run.project, run.id, run.name, alert))
        if svc.mlflow is not None:
            svc.mlflow.add_outcomes(processed.run_id, processed.outcomes)
            if processed.finished:
                svc.mlflow.finish_run(processed.run_id)

    return listener


def create_app(
    settings: Settings, check_schema: bool = True, registry: PluginRegistry | None = None
) -> FastAPI:
    """Build the service for ``settings``: engine, store, plugins, sinks, routes.

    ``registry`` replaces the plugins loaded from entry points (tests, embedding).

    Refuses (SchemaOutOfDate, naming ``apmon db upgrade``) a database that is not at this
    apmon's schema revision unless ``check_schema`` is False; /readyz reports the same check.
    """
    engine = make_engine(settings.database_url)
    if check_schema:
        require_current_schema(engine)
    store = SqlStore(engine)
    if registry is None:
        registry = load_plugins(only=settings.plugins)
    mlflow_sink = None
    if settings.mlflow_tracking_uri:

        def resolve(run_id: str) -> str | None:
            return store.run(run_id).mlflow_run_id

        def report(run_id: str, mlflow_run_id: str) -> None:
            # On the sink's thread, after the run finished: never on the ingest path.
            from monitor.report import log_report_to_mlflow, render_report

            with tempfile.TemporaryDirectory(prefix="apmon-report-") as out:
                files = render_report(store, run_id, Path(out))
                alerts = store.alerts(run_id)  # every worker's, for the alert tags' counts
                log_report_to_mlflow(settings.mlflow_tracking_uri, mlflow_run_id, files, alerts)

        mlflow_sink = AsyncMlflowSink(
            settings.mlflow_tracking_uri,
            settings.mlflow_experiment,
            resolve=resolve,
            claim=store.claim_mlflow_run_id,
            retry_max_seconds=settings.mlflow_retry_max_seconds,
            report=report,
        )
    ref: dict[str, Services] = {}
    services = Services(
        settings=settings,
        engine=engine,
        store=store,
        registry=registry,
        ingestor=Ingestor(
            store,
            registry,
            settings.alert_cooldown_steps,
            on_committed=[_after_commit(ref)],  # type: ignore[list-item]
        ),
        metrics=ServiceMetrics(),
        webhooks=WebhookSender(settings.webhook_urls, settings.webhook_timeout_seconds),
        mlflow=mlflow_sink,
        tokens=TokenCache(settings.token_cache_seconds),
    )
    ref["services"] = services

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _sweep_pending(services)
        # What exists now (the app, plugins, mlflow, pydantic schemas) lives as long as the
        # worker. Moving it out of the collector's generations keeps full collections short:
        # otherwise a generation-2 pass over it stalls the request in flight by ~0.1 s.
        gc.freeze()
        yield
        services.webhooks.close()
        if services.mlflow is not None:
            services.mlflow.close()
        engine.dispose()

    app = FastAPI(
        title="apmon monitoring service",
        version=API_VERSION,
        description="Ingest of activation-pattern summaries and probes from training jobs, "
        "measure plugins, alerts, and queries of the results. Every /api/v1 route and /metrics "
        "need 'Authorization: Bearer <token>' (apmon tokens create --project P); /healthz, "
        "/readyz and this description (/docs, /redoc, /openapi.json) need none.",
        lifespan=lifespan,
    )
    app.state.services = services
    for router in (health.router, runs.router, ingest.router, results.router, plugins.router):
        app.include_router(router)

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, error: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status.HTTP_404_NOT_FOUND)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        # The offending input is left out: it may be NaN or huge, and the client has it anyway.
        # Keys in 'loc' come from the input and may hold lone surrogates: escaped to be sent.
        detail = [
            {
                "loc": [_printable(part) for part in e.get("loc", ())],
                "msg": _printable(e.get("msg", "")),
                "type": e.get("type"),
            }
            for e in error.errors()
        ]
        return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        # FastAPI answers a body its JSON parser gave up on with a bare 400: say why instead.
        if isinstance(error.__cause__, RecursionError):
            detail = "the JSON body is nested too deeply for any apmon request"
            return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)
        if isinstance(error.__cause__, UnicodeDecodeError):
            detail = f"the body is not UTF-8 JSON ({error.__cause__.reason} at byte "
            detail += f"{error.__cause__.start})"
            return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)
        return await http_exception_handler(request, error)

    @app.exception_handler(StoreError)
    async def store_error(_request: Request, error: StoreError) -> JSONResponse:
        logger.error("database error: %s", error)
        return JSONResponse(
            {"detail": "the database is unavailable; retry later"},
            status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def _printable(value: object) -> object:
    """Text that can be sent as UTF-8 JSON (lone surrogates escaped); other values as they are."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _sweep_pending(services: Services) -> None:
    """At start-up, process batches left ready by a worker that died between requests."""
    try:
        for run_id in services.store.runs_with_pending_batches():
            services.ingestor.drain(run_id)
    except Exception:
        logger.exception("start-up sweep of pending batches failed; ingest will retry it")


def app_from_environment() -> FastAPI:
    """Factory for ``uvicorn --factory``: settings from APMON_* environment variables."""
    return create_app(Settings())
