"""The ``tokenmill`` command: generate, chat and serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tokenmill.config import EngineArgs


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)


def _sampling_params(args):
    from tokenmill import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="Fast LLM inference and serving")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one or more prompts")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument(
        "--model", default=None, help="model id, folder or .gguf (default: embedded SmolLM2)"
    )
    _sampling_args(gen)
    EngineArgs.add_cli_args(gen)

    chat = sub.add_parser("chat", help="talk to a model interactively")
    chat.add_argument(
        "--model", default=None, help="model id, folder or .gguf (default: embedded SmolLM2)"
    )
    chat.add_argument("--system", default=None, help="system prompt")
    _sampling_args(chat)
    EngineArgs.add_cli_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model id, folder or .gguf (default: embedded SmolLM2)",
    )
    serve.add_argument("--model", dest="model_flag", default=None, help="the model, as a flag")
    from tokenmill.entrypoints.server_args import add_server_args

    add_server_args(serve)
    EngineArgs.add_cli_args(serve)
    return parser


def cmd_generate(args) -> int:
    from tokenmill import LLM

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    for out in llm.generate(args.prompts, _sampling_params(args), use_tqdm=False):
        print(out.prompt + out.outputs[0].text)
    llm.engine.shutdown()
    return 0


def cmd_chat(args) -> int:
    from tokenmill import LLM

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    params = _sampling_params(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; an empty line or Ctrl-D quits.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        print(reply)
        messages.append({"role": "assistant", "content": reply})
    llm.engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.model_flag is not None:
        if args.model is not None and args.model != args.model_flag:
            parser.error(f"two models given: {args.model} and --model {args.model_flag}")
        args.model = args.model_flag
    if int(os.environ.get("RANK", "0")) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun every rank runs this command; ranks above 0 hold model shards.
        from tokenmill.worker import run_worker

        run_worker(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            "env://",
            EngineArgs.from_cli_args(args),
        )
        return 0
    if args.command == "serve":
        from tokenmill.entrypoints.app import run_server

        return run_server(args)
    return {"generate": cmd_generate, "chat": cmd_chat}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
