"""Flags of ``tokenmill serve`` that are not engine arguments."""

import argparse
import json
import os


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("TOKENMILL_API_KEY") or os.environ.get("VLLM_API_KEY"),
        help="required bearer token (or TOKENMILL_API_KEY, or VLLM_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="names clients use for the model, the first in responses (default: the model)",
    )
    p.add_argument("--allowed-origins", type=json.loads, default=["*"], help="CORS origins (JSON)")
    p.add_argument("--allowed-methods", type=json.loads, default=["*"], help="CORS methods (JSON)")
    p.add_argument("--allowed-headers", type=json.loads, default=["*"], help="CORS headers (JSON)")
    p.add_argument("--allow-credentials", action="store_true", help="CORS credentials")
    p.add_argument(
        "--uvicorn-log-level",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        default="warning",
    )
    p.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    p.add_argument(
        "--max-n", type=int, default=16, help="largest n / best_of a request may ask for"
    )
    p.add_argument(
        "--tool-call-parser",
        choices=["hermes", "llama3_json", "mistral"],
        default=None,
        help="the model's tool call format (hermes: <tool_call>, also Qwen; "
        "llama3_json; mistral: [TOOL_CALLS])",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide whether to call tools (tool_choice "auto")',
    )
    p.add_argument(
        "--reasoning-parser",
        choices=["deepseek_r1", "qwen3"],
        default=None,
        help="put <think>...</think> in reasoning_content (deepseek_r1: the template "
        "opens the block; qwen3: the model does)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds to finish in-flight requests on SIGTERM",
    )
    p.add_argument(
        "--log-stats-interval", type=float, default=10.0, help="seconds between engine stat lines"
    )
