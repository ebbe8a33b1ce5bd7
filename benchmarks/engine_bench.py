"""Engine-level throughput benchmark (no HTTP): prints a table.

The workload: a gpt2-sized model (124M) with random weights, 32-token distinct
prompts, 128 greedy tokens each, end-of-text ignored; N requests submitted at once through the
async engine, at several concurrency levels, and again with the batch forced to 1.

    python benchmarks/engine_bench.py                    # float32 on CPU, 1 / 8 / 32
    python benchmarks/engine_bench.py --no-pack-weights  # float32, MKL for every matmul
    python benchmarks/engine_bench.py --quantization int8
    python benchmarks/engine_bench.py --levels 1,64,256 --device cuda --dtype bfloat16 [--fast-decode]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

import torch

from model.config import GPTConfig
from model.dtypes import DTYPES
from model.gpt2 import GPT
from model.kernel_choice import (
    int8_kv_cache_dtype,
    use_fastest_float32_kernels,
    use_fastest_int8_kernels,
)
from model.kv_cache import KV_CACHE_DTYPES
from model.quantize import QUANTIZATIONS, apply_quantization
from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.engine.async_engine import AsyncEngine
from service.engine.config import EngineConfig
from service.engine.llm_engine import LLMEngine
from service.engine.params import StopParams


def distinct_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """`count` different prompts of exactly `length` token ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (count, length), generator=generator).tolist()


async def run_level(
    engine: AsyncEngine, concurrency: int, prompt_tokens: int, new_tokens: int, seed: int
) -> dict[str, float]:
    """Submit `concurrency` requests at once; returns throughput and time-to-first-token."""
    stop = StopParams(max_new_tokens=new_tokens, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0)
    prompts = distinct_prompts(concurrency, prompt_tokens, seed)
    ttfts: list[float] = []
    generated = 0

    async def one(prompt: list[int]) -> None:
        nonlocal generated
        start = time.perf_counter()
        first = None
        async for event in engine.submit(prompt, greedy, stop):
            if first is None and event.tokens:
                first = time.perf_counter() - start
            generated += len(event.tokens)
        ttfts.append(first if first is not None else float("nan"))

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    elapsed = time.perf_counter() - started
    ttfts.sort()
    return {
        "tokens_per_s": generated / elapsed,
        "ttft_p50": statistics.median(ttfts),
        "ttft_max": ttfts[-1],
        "wall_s": elapsed,
        "generated": generated,
    }


async def bench(args: argparse.Namespace) -> list[tuple[str, int, dict[str, float]]]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = GPTConfig.from_preset(args.model)
    model = GPT(config).init_weights(0).eval().to(device=device, dtype=DTYPES[args.dtype])
    probe_rows = max(32, *args.levels)
    kv_cache_dtype = args.kv_cache_dtype
    if args.quantization == "int8":  # as `gptserve serve --quantization int8` does
        model = use_fastest_int8_kernels(model, probe_rows)
        kv_cache_dtype = int8_kv_cache_dtype(model, kv_cache_dtype, max(args.levels))
    else:
        model = apply_quantization(model, args.quantization)
    if args.pack_weights:  # as `gptserve serve` does by default on CPU
        use_fastest_float32_kernels(model, probe_rows)
    tokenizer = Tokenizer.default()
    rows = []
    for label, batch_cap in (("batched", None), ("batch=1", 1)):
        for level in args.levels:
            if batch_cap == 1 and level > max(8, min(args.levels)) and not args.full_baseline:
                continue  # the unbatched baseline is linear in the level: skip the long ones
            engine_config = EngineConfig(
                max_batch_size=batch_cap or level,
                max_queue_size=level,
                max_prefill_tokens=args.max_prefill_tokens,
                max_model_len=args.prompt_tokens + args.new_tokens,
                fast_decode=args.fast_decode,
                kv_cache_dtype=kv_cache_dtype,
            )
            engine = AsyncEngine(LLMEngine(model, tokenizer, engine_config))
            await engine.start(warm_up=True)
            result = await run_level(engine, level, args.prompt_tokens, args.new_tokens, level)
            await engine.shutdown()
            rows.append((label, level, result))
            print(f"  {label:8s} {level:4d} -> {result['tokens_per_s']:.1f} tok/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--model", default="gpt2", help="architecture preset (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    parser.add_argument(
        "--pack-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU, unquantized: oneDNN-packed linear weights, as the server's default",
    )
    parser.add_argument("--fast-decode", action="store_true", help="decode CUDA graphs")
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="as gptserve serve's (auto: the model's; with int8, measured at start-up)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-prefill-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--full-baseline", action="store_true", help="batch=1 at every level")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    on_cpu = args.device == "cpu"
    args.pack_weights &= on_cpu and args.dtype == "float32" and args.quantization == "none"
    if args.fast_decode and on_cpu:
        print("# note: on CPU --fast-decode only pads to its buckets (no CUDA graphs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {args.model} random weights, {args.dtype} on {args.device}, "
        f"quantization {args.quantization}, packed weights {args.pack_weights}, "
        f"fast decode {args.fast_decode}, KV cache {args.kv_cache_dtype} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; {args.prompt_tokens}-token prompts, "
        f"{args.new_tokens} greedy tokens, eos ignored"
    )
    rows = asyncio.run(bench(args))
    print()
    print("| batching | concurrent | tokens/s | TTFT p50 (s) | TTFT max (s) | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, level, r in rows:
        print(
            f"| {label} | {level} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.3f} "
            f"| {r['ttft_max']:.3f} | {r['wall_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
