"""`meshllm generate`: generation in one process, the model run as K in-process stages."""

from __future__ import annotations

import argparse

from meshllm.cli.serve import add_quantize_arguments
from meshllm.defaults import AUTO_DTYPE, DTYPES, ENGINES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="checkpoint folder, hub id, or 'demo' (default)")
    parser.add_argument("--prompt", required=True, help="the user message (the chat template is applied)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--stages", type=int, default=1, help="split the layers into this many in-process stages"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default=AUTO_DTYPE, choices=(AUTO_DTYPE, *DTYPES))
    parser.add_argument(
        "--engine",
        default=None,
        choices=ENGINES,
        help="default: mlx on Apple silicon, torch on a GPU, else ggml",
    )
    add_quantize_arguments(parser)
    parser.add_argument(
        "--raw", action="store_true", help="use the prompt as it is, without the chat template"
    )


def run(args: argparse.Namespace) -> int:
    from meshllm.cli import event_loop
    from meshllm.errors import ConfigError
    from meshllm.log import setup_logging

    setup_logging("generate", level="WARNING")
    if args.max_tokens < 1:
        raise ConfigError("--max-tokens must be at least 1")
    if args.stages < 1:
        raise ConfigError("--stages must be at least 1")
    return event_loop.run(_generate(args))


async def _generate(args: argparse.Namespace) -> int:
    import sys
    import time

    from meshllm import compute
    from meshllm.engines import default_engine, load_stage
    from meshllm.engines.base import Stage
    from meshllm.models.checkpoint import DEMO_MODEL, Checkpoint
    from meshllm.models.plan import plan_layers
    from meshllm.models.tokenizer import chat_prompt_ids, load_tokenizer
    from meshllm.runtime.engine_client import GenerateRequest
    from meshllm.runtime.engine_loop import EngineLoop
    from meshllm.step import SamplingParams

    if args.model == DEMO_MODEL:
        print(
            "model demo: random weights, so the output is noise (pass --model <hub id or folder> for a real one)",
            file=sys.stderr,
        )
    checkpoint = Checkpoint.open(args.model)
    tokenizer = load_tokenizer(checkpoint.path)
    engine = args.engine or default_engine(checkpoint=checkpoint)
    ranges = plan_layers(checkpoint.config.num_hidden_layers, [1.0] * args.stages)

    def load_stages() -> list[Stage]:
        return [
            load_stage(
                engine,
                checkpoint,
                layer_range,
                dtype=checkpoint.served_dtype(args.dtype),
                quantize=args.quantize,
                group_size=args.quantize_group,
            )
            for layer_range in ranges
        ]

    stages = await compute.run_async(load_stages)  # on the thread that computes their steps
    print("stages: " + ", ".join(f"[{start}, {end})" for start, end in ranges), file=sys.stderr)

    if args.raw:
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False)
    else:
        prompt_ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}])
    eos = tuple(checkpoint.config.eos_token_ids)
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed, eos_token_ids=eos)
    engine_loop = EngineLoop.in_process(stages)
    started = time.perf_counter()
    first_token_at = None
    generated: list[int] = []
    printed = ""
    async for token in engine_loop.submit(GenerateRequest(prompt_ids, sampling, args.max_tokens)):
        first_token_at = first_token_at or time.perf_counter()
        if token.finish_reason == "stop":
            break
        generated.append(token.token_id)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            print(text[len(printed) :], end="", flush=True)
            printed = text
    elapsed = time.perf_counter() - started
    print()
    decode_time = time.perf_counter() - (first_token_at or started)
    rate = (len(generated) - 1) / decode_time if len(generated) > 1 and decode_time > 0 else 0.0
    print(
        f"{len(prompt_ids)} prompt tokens, {len(generated)} generated in {elapsed:.2f} s: "
        f"time to first token {((first_token_at or started) - started) * 1000:.0f} ms, {rate:.1f} tokens/s",
        file=sys.stderr,
    )
    await engine_loop.close()
    return 0
