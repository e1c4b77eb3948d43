"""`splitserve generate` and `splitserve chat`: text streams to stdout as it arrives.

    splitserve generate "Once upon a time" --max-new-tokens 40 --stop "."
    splitserve chat "Where is Paris?" --system "Answer briefly." --max-tokens 30
    splitserve generate --no-stream "..."     # one JSON answer instead of a stream

A streamed call ends with one JSON line (finish_reason and usage) after the text.
"""

from __future__ import annotations

import sys

from client.cli import command, read_texts
from client.generation_client import GenerationClient


def _sampling_args(parser, length_flag: str) -> None:
    parser.add_argument("texts", nargs="*", help="the prompt (default: stdin)")
    parser.add_argument(length_flag, type=int, help="most tokens to generate")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--adapter", default="", help="PEFT adapter name")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="one answer, not a stream")


def _settings(args, names) -> dict:
    values = {name: getattr(args, name) for name in names}
    return {k: v for k, v in values.items() if v is not None}


def _finish(generation, stream) -> dict:
    if stream is not None:
        for text in stream:
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        generation = stream.result
    summary = {"finish_reason": generation.finish_reason,
               "usage": {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                         "total_tokens": generation.prompt_tokens + generation.completion_tokens}}
    return summary if stream is not None else {"text": generation.text, **summary}


@command("generate", "generate text from a prompt (text-generation, text2text, summarization, translation)")
def _generate(parser):
    _sampling_args(parser, "--max-new-tokens")
    parser.add_argument("--full-text", dest="return_full_text", action="store_true", default=None,
                        help="include the prompt in the answer")
    parser.add_argument("--no-full-text", dest="return_full_text", action="store_false")

    def run(client, args):
        gen = GenerationClient(channel=client.channel, timeout=client.timeout)
        prompt = "\n".join(read_texts(args))
        settings = _settings(args, ["max_new_tokens", "temperature", "top_p", "top_k", "seed", "do_sample", "stop",
                                    "return_full_text"])
        if args.stream:
            return _finish(None, gen.generate_stream(prompt, args.adapter, **settings))
        return _finish(gen.generate(prompt, args.adapter, **settings), None)

    return run


@command("chat", "chat with the model (llm/v1/chat, the tokenizer's chat template)")
def _chat(parser):
    _sampling_args(parser, "--max-tokens")
    parser.add_argument("--system", help="a system message before the user's")

    def run(client, args):
        gen = GenerationClient(channel=client.channel, timeout=client.timeout)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": "\n".join(read_texts(args))}]
        settings = _settings(args, ["max_tokens", "temperature", "top_p", "top_k", "seed", "do_sample", "stop"])
        if args.stream:
            return _finish(None, gen.chat_stream(messages, args.adapter, **settings))
        return _finish(gen.chat(messages, args.adapter, **settings), None)

    return run
