"""llama.cpp as a single-stream peer, through llama-cpp-python.

`dequantized_gguf` (needs the `gguf` package) rewrites a quantized GGUF with
every quantized tensor dequantized to bfloat16 or float32, so llama.cpp reads
the same bytes per token as tokenmill does with weights of that dtype. Run as a script under the
interpreter of a virtualenv that has llama-cpp-python, it generates one
request greedily and writes time to first token and decode tokens/s as JSON:

  python -m bench.llama_cpp_runner --gguf M.gguf --prompt 1,2,3 --max-tokens 128 --out r.json

With --windows W.json (lists of token ids) it instead writes the logits of
every position of each window, teacher-forced, to OUT/0.npy, OUT/1.npy, ...
(bench/gguf_accuracy.py).
"""

from __future__ import annotations

import argparse
import json
import time


def dequantized_gguf(src: str, dst: str, dtype: str = "bfloat16") -> None:
    """Writes `src` to `dst` with its quantized tensors as `dtype` (float tensors kept)."""
    import gguf
    from gguf.quants import dequantize, quantize

    bf16 = dtype == "bfloat16"
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == "general.file_type":
            value = gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    keep = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for t in reader.tensors:
        if t.tensor_type in keep:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            continue
        weights = dequantize(t.data, t.tensor_type)
        if bf16:
            weights = quantize(weights, gguf.GGMLQuantizationType.BF16)
        raw_dtype = gguf.GGMLQuantizationType.BF16 if bf16 else None
        writer.add_tensor(t.name, weights, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def generate(gguf_path: str, prompt: list[int], max_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(
        model_path=gguf_path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def run(tokens, n):
        start, first, count = time.perf_counter(), None, 0
        for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter() - start
            if count == n:
                break
        return first, time.perf_counter() - start

    run(prompt[:16], 8)  # warm-up
    ttft, total = run(prompt, max_tokens)
    return {"ttft_s": ttft, "decode_tok_s": (max_tokens - 1) / (total - ttft)}


def window_logits(gguf_path: str, windows: list[list[int]], out_dir: str, threads: int) -> None:
    import os

    import numpy as np
    from llama_cpp import Llama

    n = max(len(w) for w in windows)
    llm = Llama(
        model_path=gguf_path,
        n_ctx=n,
        n_batch=n,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )
    for i, window in enumerate(windows):
        llm.reset()
        llm.eval(window)
        np.save(
            os.path.join(out_dir, f"{i}.npy"), np.asarray(llm.scores[: len(window)], np.float32)
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt", default=None, help="comma-separated token ids")
    ap.add_argument("--windows", default=None, help="JSON lists of token ids: write their logits")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.windows:
        with open(args.windows) as f:
            window_logits(args.gguf, json.load(f), args.out, args.threads)
        return
    prompt = [int(t) for t in args.prompt.split(",")]
    result = generate(args.gguf, prompt, args.max_tokens, args.threads)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
