"""How far a GGUF file's next-token distributions move when it runs from its
blocks: tokenmill and llama.cpp, teacher-forced over the same windows of
text, each against the same weights dequantized to float64 (transformers),
side by side: mean KL divergence from the reference, and how often the top
token agrees with the reference's.

  python -m bench.gguf_accuracy [--model M.gguf] [--windows 4] [--window-len 512]
      [--llama-cpp-python ../peers/llamacpp/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import numpy as np
import torch

from bench.common import load_workload, table


def text_windows(tokenizer, count: int, length: int) -> list[list[int]]:
    """Windows of `length` tokens (BOS first where the model has one) cut
    from the workload's prompts (token ids of the default model), decoded to
    text and tokenized anew."""
    from tokenmill.loader.gguf import gguf_metadata
    from tokenmill.loader.hf import resolve_model_path
    from transformers import AutoTokenizer

    default = AutoTokenizer.from_pretrained(gguf_metadata(resolve_model_path(None)))
    ids: list[int] = []
    for request in load_workload("workload_main.json"):
        text = default.decode(request["prompt_token_ids"], skip_special_tokens=True)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= count * length:
            break
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = length - len(bos)
    return [bos + ids[i * body : (i + 1) * body] for i in range(count)]


def tokenmill_logits(
    path: str, windows: list[list[int]], dtype: str, activation_bits: int
) -> list[torch.Tensor]:
    """float32 logits of every window position (all but the last), through
    prompt logprobs: the runner's prompt logits are kept as they pass."""
    from tokenmill import LLM, SamplingParams
    from tokenmill.engine import model_runner

    seen: list[torch.Tensor] = []
    original = model_runner.prompt_logprobs

    def keep(logits, targets):
        seen.append(logits.float().clone())
        return original(logits, targets)

    llm = LLM(
        path,
        dtype=dtype,
        gguf_activation_bits=activation_bits,
        max_model_len=max(map(len, windows)) + 8,
    )
    model_runner.prompt_logprobs = keep
    try:
        out = []
        for window in windows:
            seen.clear()
            params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
            llm.generate([{"prompt_token_ids": window}], params, use_tqdm=False)
            out.append(torch.cat(seen)[: len(window) - 1])
        return out
    finally:
        model_runner.prompt_logprobs = original


def llama_cpp_logits(python: str, path: str, windows: list[list[int]]) -> list[torch.Tensor]:
    runner = os.path.join(os.path.dirname(__file__), "llama_cpp_runner.py")
    with tempfile.TemporaryDirectory() as d:
        spec = os.path.join(d, "windows.json")
        with open(spec, "w") as f:
            json.dump(windows, f)
        subprocess.run([python, runner, "--gguf", path, "--windows", spec, "--out", d], check=True)
        return [
            torch.from_numpy(np.load(os.path.join(d, f"{i}.npy")))[: len(w) - 1]
            for i, w in enumerate(windows)
        ]


def compare(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Sum over positions of KL(reference || logits), and of top-1 agreements."""
    ref = reference.log_softmax(-1)
    test = logits.double()[:, : ref.shape[1]].log_softmax(-1)
    kl = (ref.exp() * (ref - test)).sum(-1)
    return kl.sum().item(), (ref.argmax(-1) == test.argmax(-1)).sum().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a GGUF file (default: the embedded model)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", help="tokenmill's activations")
    ap.add_argument(
        "--activation-bits", type=int, default=8, help="of tokenmill's integer products (8 or 14)"
    )
    ap.add_argument("--llama-cpp-python", default=None, help="interpreter with llama-cpp-python")
    args = ap.parse_args()
    from tokenmill.loader.gguf import gguf_metadata, gguf_to_hf
    from tokenmill.loader.hf import resolve_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(gguf_metadata(path))
    windows = text_windows(tokenizer, args.windows, args.window_len)
    engines = {"tokenmill": tokenmill_logits(path, windows, args.dtype, args.activation_bits)}
    if args.llama_cpp_python:
        engines["llama.cpp"] = llama_cpp_logits(args.llama_cpp_python, path, windows)
    reference = AutoModelForCausalLM.from_pretrained(gguf_to_hf(path), dtype=torch.float64).eval()
    totals = {name: [0.0, 0] for name in engines}
    positions = 0
    with torch.inference_mode():
        for i, window in enumerate(windows):
            ref = reference(torch.tensor([window])).logits[0, :-1]
            positions += ref.shape[0]
            for name, logits in engines.items():
                kl, agree = compare(ref, logits[i])
                totals[name][0] += kl
                totals[name][1] += agree
    rows = [[n, kl / positions, 100 * agree / positions] for n, (kl, agree) in totals.items()]
    print(
        f"{os.path.basename(path)}: {positions} positions in {len(windows)} windows, "
        "against its weights dequantized to float64"
    )
    print(table(rows, ["engine", "mean KL", "top-1 agreement %"]))


if __name__ == "__main__":
    main()
