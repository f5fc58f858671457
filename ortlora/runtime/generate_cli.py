"""ortlora-generate: generate text from the artifacts and an adapter, streaming tokens as they come."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ortlora.errors import OrtloraError, add_debug_argument, cli_entry
from ortlora.files import parse_json
from ortlora.runtime.data import BadExample, check_messages
from ortlora.runtime.generate import Generator, Sampling
from ortlora.runtime.providers import PROVIDERS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ortlora-generate", description=__doc__, allow_abbrev=False)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/tiny"), help="an ortlora-build artifact directory")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="a checkpoint, run directory or PEFT adapter (default: none, the base model)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="plain text to continue")
    prompt.add_argument("--messages", help='chat messages as JSON, e.g. \'[{"role": "user", "content": "Hi"}]\', '
                                           "rendered with the chat template")
    defaults = Sampling()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help=f"most tokens to generate (default: {defaults.max_new_tokens}; fewer where the model's "
                             "context ends)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 (default): off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1 (default): off")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty, help="1 (default): off")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    parser.add_argument("--ep", default="cpu", choices=tuple(PROVIDERS), help="execution provider (default: cpu)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")
    add_debug_argument(parser)
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    messages = None
    if args.messages is not None:
        try:
            messages = parse_json(args.messages)
        except ValueError as e:
            raise OrtloraError(f"--messages is {e}") from None
        try:
            check_messages(messages)
        except BadExample as e:
            raise OrtloraError(f"--messages: {e}") from None
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                        args.seed, args.stop)
    sampling.check()
    if args.threads is not None and args.threads <= 0:
        raise OrtloraError(f"--threads must be positive, got {args.threads}")
    generator = Generator(args.artifacts, args.adapter, ep=args.ep, threads=args.threads)
    prompt = generator.prompt(args.prompt, messages)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generator.generate(prompt, sampling, on_text=stream, use_cache=not args.no_cache)
    print()
    print(f"[{result.prompt_tokens} prompt tokens at {result.prompt_tokens_per_s:,.0f} tok/s, {len(result.tokens)} "
          f"generated at {result.tokens_per_s:,.1f} tok/s, stopped by {result.stop_reason}]", file=sys.stderr)
    return 0
