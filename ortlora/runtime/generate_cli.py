"""ortlora-generate: generate text from the artifacts and an adapter, streaming tokens as they come."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ortlora.errors import OrtloraError, add_debug_argument, cli_entry
from ortlora.files import parse_json
from ortlora.runtime.config import check_paths, check_seed, check_threads
from ortlora.runtime.data import BadExample, check_messages, check_tools, jsonl_lines, parse_line
from ortlora.runtime.generate import Generator, Sampling
from ortlora.runtime.providers import parse_ep, parse_ep_options

PROMPT_KEYS = {"prompt", "messages", "tools"}
BATCH_SIZE = 8  # --prompts-file's prompts generated at once


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ortlora-generate", description=__doc__, allow_abbrev=False)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/tiny"), help="an ortlora-build artifact directory")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="a checkpoint, run directory or PEFT adapter (default: none, the base model)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="plain text to continue")
    prompt.add_argument("--messages", help='chat messages as JSON, e.g. \'[{"role": "user", "content": "Hi"}]\', '
                                           "rendered with the chat template")
    prompt.add_argument("--prompts-file", type=Path,
                        help='JSON Lines, one prompt per line: {"prompt": ...} or {"messages": [...], "tools"?: [...]}; '
                             "generated in batches, one JSON line per prompt on stdout, in order")
    parser.add_argument("--tools", help='with --messages: the functions the model may call, as JSON, e.g. \'[{"type": '
                                        '"function", "function": {"name": "get_weather", "parameters": {...}}}]\'')
    defaults = Sampling()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help=f"most tokens to generate (default: {defaults.max_new_tokens}; fewer where the model's "
                             "context ends)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 (default): greedy")
    # None: not given (Sampling's default then), so that a sampling option given with greedy decoding is refused.
    parser.add_argument("--top-k", type=int, default=None, help=f"{defaults.top_k} (default): off")
    parser.add_argument("--top-p", type=float, default=None, help=f"{defaults.top_p:g} (default): off")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty, help="1 (default): off")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    parser.add_argument("--ep", default="cpu", help="execution provider: cpu (default), cuda, openvino, ... or an installed "
                        "plugin's (onnxruntime-ep-NAME, onnxruntime-ggml: ggml), NAME:gpu|npu|cpu for one of its devices")
    parser.add_argument("--ep-option", action="append", metavar="KEY=VALUE",
                        help="an option for --ep's provider, over ortlora's own (repeatable)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"--prompts-file: prompts generated at once (default: {BATCH_SIZE})")
    add_debug_argument(parser)
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tools is not None and args.messages is None:
        raise OrtloraError("--tools goes with --messages, the conversation that may call them")
    sampling = check_options(args)
    if args.prompts_file is not None:
        requests = read_prompts(args.prompts_file)
    else:
        messages = None if args.messages is None else checked(check_messages, parse(args.messages, "--messages"), "--messages")
        tools = None if args.tools is None else checked(check_tools, parse(args.tools, "--tools"), "--tools")
        requests = [(args.prompt, messages, tools)]
    parse_ep(args.ep)
    ep_options = parse_ep_options(args.ep_option)
    if ep_options and args.ep == "cpu":
        raise OrtloraError("--ep-option passes options to --ep's provider, and --ep is cpu: leave it out, or name the "
                           "provider with --ep")
    generator = Generator(args.artifacts, args.adapter, ep=args.ep, threads=args.threads, ep_options=ep_options)
    if any(tools for _, _, tools in requests) and not generator.tokenizer.renders("tools"):
        raise OrtloraError(f"--tools: the chat template ({generator.tokenizer.template_source}) never reads 'tools', "
                           "so the model would not see them")
    prompts = [generator.prompt(*request) for request in requests]
    if args.prompts_file is not None:
        return generate_file(generator, prompts, sampling, args)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generator.generate(prompts[0], sampling, on_text=stream, use_cache=not args.no_cache)
    print()
    print(f"[{result.prompt_tokens} prompt tokens at {result.prompt_tokens_per_s:,.0f} tok/s, {len(result.tokens)} "
          f"generated at {result.tokens_per_s:,.1f} tok/s, stopped by {result.stop_reason}]", file=sys.stderr)
    return 0


def check_options(args: argparse.Namespace) -> Sampling:
    """The sampling settings; values no generation can use and options it would ignore are refused, in one line
    and before the model loads."""
    if args.batch_size is not None:
        if args.prompts_file is None:
            raise OrtloraError(f"--batch-size {args.batch_size} is how many prompts of --prompts-file are generated at "
                               "once, and one prompt is given: leave --batch-size out, or pass --prompts-file")
        if args.batch_size <= 0:
            raise OrtloraError(f"--batch-size must be positive, got {args.batch_size}")
    args.batch_size = BATCH_SIZE if args.batch_size is None else args.batch_size
    if "" in args.stop:
        raise OrtloraError('--stop "" would stop before the first token: pass a non-empty string to stop at')
    defaults = Sampling()
    sampling = Sampling(args.max_new_tokens, args.temperature, defaults.top_k if args.top_k is None else args.top_k,
                        defaults.top_p if args.top_p is None else args.top_p, args.repetition_penalty, args.seed,
                        args.stop)
    sampling.check()
    check_seed(args.seed)
    check_threads(args.threads)
    if args.temperature == 0:  # greedy: the likeliest token, whatever the sampler's settings
        sampler = [(flag, value) for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p),
                                                     ("--seed", args.seed)) if value is not None]
        if sampler:
            flag, value = sampler[0]
            raise OrtloraError(f"{flag} {value} sets how tokens are sampled, and --temperature 0 (the default) takes "
                               f"the likeliest token instead: pass a --temperature above 0 to sample, or leave {flag} out")
    check_paths({"--artifacts": args.artifacts, "--adapter": args.adapter, "--prompts-file": args.prompts_file})
    return sampling


def parse(text: str, flag: str):
    try:
        return parse_json(text)
    except ValueError as e:
        raise OrtloraError(f"{flag} is {e}") from None


def checked(check, value, where: str):
    """check_messages(value) or check_tools(value), a complaint prefixed with ``where``."""
    try:
        return check(value)
    except BadExample as e:
        raise OrtloraError(f"{where}: {e}") from None


def read_prompts(path: Path) -> list[tuple[str | None, list[dict] | None, list[dict] | None]]:
    """(prompt, messages, tools) of each line of a --prompts-file; the first bad line is an error naming it."""
    requests = []
    for lineno, raw in jsonl_lines(path, "--prompts-file"):
        where = f"{path}:{lineno}"
        row = checked(parse_line, raw, where)
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row) or set(row) - PROMPT_KEYS:
            raise OrtloraError(f'{where}: expected {{"prompt": "..."}} or {{"messages": [...], "tools"?: [...]}}')
        if "prompt" in row and (not isinstance(row["prompt"], str) or "tools" in row):
            raise OrtloraError(f'{where}: "prompt" must be a string (and "tools" goes with "messages")')
        messages = checked(check_messages, row["messages"], where) if "messages" in row else None
        tools = checked(check_tools, row["tools"], where) if row.get("tools") is not None else None
        requests.append((row.get("prompt"), messages, tools))
    if not requests:
        raise OrtloraError(f"--prompts-file {path} holds no prompts")
    return requests


def generate_file(generator: Generator, prompts: list[list[int]], sampling: Sampling, args: argparse.Namespace) -> int:
    generated, seconds = 0, 0.0
    for start in range(0, len(prompts), args.batch_size):
        batch = generator.generate_batch(prompts[start: start + args.batch_size], sampling, use_cache=not args.no_cache)
        for index, result in enumerate(batch, start=start):
            print(json.dumps({"index": index, "text": result.text, "tokens": result.tokens,
                              "stop_reason": result.stop_reason, "prompt_tokens": result.prompt_tokens},
                             ensure_ascii=False), flush=True)
        generated += sum(len(r.tokens) for r in batch)
        seconds += batch[0].prompt_seconds + batch[0].generation_seconds
    print(f"[{len(prompts)} prompts in batches of {args.batch_size}: {generated} tokens generated in {seconds:.1f} s, "
          f"{generated / seconds:,.1f} tok/s]", file=sys.stderr)
    return 0
