"""The FastAPI application around a Server, and ``tokenmill serve``."""

from __future__ import annotations

import contextlib
import logging
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


def build_app(server: Server) -> FastAPI:
    engine = server.engine

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="tokenmill", version=tokenmill.__version__, lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(
                413, f"request body larger than {MAX_BODY_BYTES} bytes", "RequestTooLarge"
            )
        if server.api_key and request.url.path not in ("/health", "/metrics"):
            if request.headers.get("authorization") != f"Bearer {server.api_key}":
                return error_response(401, "invalid or missing API key", "AuthenticationError")
        t0 = time.monotonic()
        response = await call_next(request)
        if request.url.path.startswith("/v1/") and request.method == "POST":
            logger.info(
                "%s %s -> %d in %.3f s",
                request.method,
                request.url.path,
                response.status_code,
                time.monotonic() - t0,
            )
        return response

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
    llm_engine = LLMEngine(engine_args)
    name = args.served_model_name or args.model or "SmolLM2-135M-Instruct"
    engine = AsyncEngine(llm_engine, name, args.log_stats_interval)
    server = Server(engine, [name], args.api_key, args.max_n, chat_options)
    app = build_app(server)
    logger.info(
        "serving %s on http://%s:%d (ready in %.1f s)",
        name,
        args.host,
        args.port,
        time.monotonic() - t0,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    _graceful_server_class()(config).run()
    return 0


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
