"""The FastAPI application around a Server, and ``tokenmill serve``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import tokenmill
from tokenmill.entrypoints.api_server import Server
from tokenmill.entrypoints.async_engine import AsyncEngine, EngineDeadError
from tokenmill.entrypoints.chat import ChatOptions
from tokenmill.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from tokenmill.entrypoints.responses import APIError, error_response
from tokenmill.errors import InvalidParameterError

logger = logging.getLogger("tokenmill.server")

MAX_BODY_BYTES = 4 << 20


class Guard:
    """Body size, API key and the request log, as plain ASGI: a wrapping
    middleware of Starlette's would hide a client's disconnect from the
    routes (Request.is_disconnected), so requests could outlive their clients."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            response = error_response(
                413, f"request body larger than {MAX_BODY_BYTES} bytes", "RequestTooLarge"
            )
            return await response(scope, receive, send)
        path = scope["path"]
        key = self.server.api_key
        if key and path not in ("/health", "/metrics"):
            if headers.get(b"authorization") != f"Bearer {key}".encode():
                response = error_response(401, "invalid or missing API key", "AuthenticationError")
                return await response(scope, receive, send)
        t0, status = time.monotonic(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        await self.app(scope, receive, send_status)
        if self.server.log_requests and path.startswith("/v1/") and scope["method"] == "POST":
            logger.info("POST %s -> %d in %.3f s", path, status[0], time.monotonic() - t0)


def build_app(server: Server) -> FastAPI:
    engine = server.engine

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="tokenmill", version=tokenmill.__version__, lifespan=lifespan)

    app.add_middleware(Guard, server=server)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(InvalidParameterError)
    async def invalid(_, e: InvalidParameterError):
        return error_response(400, e.message, "BadRequestError", e.param)

    @app.exception_handler(EngineDeadError)
    async def dead(_, e: EngineDeadError):
        return error_response(503, str(e), "ServiceUnavailableError")

    @app.exception_handler(RequestValidationError)
    async def validation(_, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, InvalidParameterError):  # raised by a model's own check
            return error_response(400, cause.message, "BadRequestError", cause.param)

        def message(err) -> str:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            if err.get("type") == "extra_forbidden":
                return f"{where} is not supported by tokenmill"
            return f"{where}: {err.get('msg')}"

        msg = "; ".join(message(err) for err in errors)
        return error_response(400, msg or "invalid request", "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        if e.status_code == 404:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return error_response(e.status_code, str(e.detail), "HTTPError")

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.alive else 503)

    @app.get("/version")
    async def version():
        return {"version": tokenmill.__version__}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return server.model_card(server.check_model(model_id))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await server.completions(req, raw)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await server.chat(req, raw)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        return server.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        return server.detokenize(req)

    return app


def run_server(args) -> int:
    import uvicorn

    from tokenmill.config import EngineArgs
    from tokenmill.engine.llm_engine import LLMEngine

    t0 = time.monotonic()
    try:
        chat_options = ChatOptions(
            args.tool_call_parser, args.enable_auto_tool_choice, args.reasoning_parser
        )
    except ValueError as e:
        logger.error("%s", e)
        return 2
    engine_args = EngineArgs.from_cli_args(args)
    llm_engine = LLMEngine(engine_args, defer_graphs=True)
    names = args.served_model_name or [args.model or "SmolLM2-135M-Instruct"]
    name = names[0]
    engine = AsyncEngine(llm_engine, name, args.log_stats_interval)
    server = Server(engine, names, args.api_key, args.max_n, chat_options)
    server.log_requests = not args.disable_log_requests
    app = build_app(server)
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(
        CORSMiddleware,
        allow_origins=args.allowed_origins,
        allow_methods=args.allowed_methods,
        allow_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
    )
    logger.info(
        "serving %s on http://%s:%d: %.1f s after the process started (imports %.1f s, "
        "engine %.1f s); decode graphs are captured while idle",
        name,
        args.host,
        args.port,
        process_age(),
        process_age() - (time.monotonic() - t0),
        time.monotonic() - t0,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    _graceful_server_class()(config).run()
    return 0


def process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return uptime - start / os.sysconf("SC_CLK_TCK")


def _graceful_server_class():
    import signal

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """SIGTERM drains in-flight requests, then the process exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {
                s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return GracefulServer
