"""`splitserve generate` and `splitserve chat`: the text streams to stdout as it arrives.

    splitserve generate "Once upon a time" --max-new-tokens 40 --stop "."
    splitserve chat "Where is Paris?" --system "Answer briefly." --max-tokens 30
    splitserve generate --no-stream "..."     # one JSON answer on stdout instead of a stream

A streamed call writes only the text to stdout; its summary (finish_reason, usage) follows as one
JSON line on stderr. Nothing is written before the model has produced its first token, so a call
the model refuses prints its error alone (not the prompt first).
"""

from __future__ import annotations

import sys

from client.cli_common import diagnostic, read_texts
from client.generation_client import GenerationClient


def _sampling_args(parser, length_flag: str) -> None:
    parser.add_argument("texts", nargs="*", help="the prompt (default: stdin)")
    parser.add_argument(length_flag, type=int, help="most tokens to generate (default: the model's)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: smallest set of tokens with this much mass")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, help="sampling seed: the same seed gives the same text")
    parser.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--adapter", default="", help="PEFT adapter name (default: the deployment's)")
    parser.add_argument("--no-stream", dest="stream", action="store_false",
                        help="one JSON answer on stdout instead of streamed text")


def _settings(args, names) -> dict:
    values = {name: getattr(args, name) for name in names}
    return {k: v for k, v in values.items() if v is not None}


def _summary(generation) -> dict:
    return {"finish_reason": generation.finish_reason,
            "usage": {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                      "total_tokens": generation.prompt_tokens + generation.completion_tokens}}


def answer(generation) -> dict:
    """A whole (not streamed) answer as JSON: text, finish_reason, usage, then what else it carries."""
    extra = {"id": generation.id, "token_ids": generation.token_ids, "logprobs": generation.logprobs,
             "applied_parameters": generation.applied_parameters}
    return {"text": generation.text, **_summary(generation), **{k: v for k, v in extra.items() if v}}


def stream_text(stream) -> None:
    """Write a stream's text to stdout, holding it back until the model has answered: text that
    arrives before the first generated token (the prompt, with --full-text) is not printed when
    the model then refuses the call. The summary goes to stderr."""
    held = []
    for text in stream:
        held.append(text)
        if stream.result.token_ids or stream.result.finish_reason or stream.result.id:
            sys.stdout.write("".join(held))
            sys.stdout.flush()
            held.clear()
    sys.stdout.write("".join(held) + "\n")
    sys.stdout.flush()
    diagnostic(_summary(stream.result))


def configure_generate(parser):
    _sampling_args(parser, "--max-new-tokens")
    parser.add_argument("--full-text", dest="return_full_text", action="store_true", default=None,
                        help="include the prompt in the answer (text-generation's default)")
    parser.add_argument("--no-full-text", dest="return_full_text", action="store_false",
                        help="only the generated text")
    parser.add_argument("--num-beams", type=int, help="beam search with this many beams (greedy; the text "
                        "arrives when the search ends)")
    parser.add_argument("--length-penalty", type=float, help="beam search: exponent on the length in a beam's "
                        "score (> 0 favours longer answers)")
    parser.add_argument("--early-stopping", action="store_true", default=None,
                        help="beam search: stop once num_beams finished candidates exist")
    parser.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size")

    def run(client, args):
        gen = GenerationClient(channel=client.channel, timeout=client.timeout)
        prompt = "\n".join(read_texts(args))
        settings = _settings(args, ["max_new_tokens", "temperature", "top_p", "top_k", "seed", "do_sample", "stop",
                                    "return_full_text", "num_beams", "length_penalty", "early_stopping",
                                    "no_repeat_ngram_size"])
        if args.stream:
            return stream_text(gen.generate_stream(prompt, args.adapter, **settings))
        return answer(gen.generate(prompt, args.adapter, **settings))

    return run


def configure_chat(parser):
    _sampling_args(parser, "--max-tokens")
    parser.add_argument("--system", help="a system message before the user's")

    def run(client, args):
        gen = GenerationClient(channel=client.channel, timeout=client.timeout)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": "\n".join(read_texts(args))}]
        settings = _settings(args, ["max_tokens", "temperature", "top_p", "top_k", "seed", "do_sample", "stop"])
        if args.stream:
            return stream_text(gen.chat_stream(messages, args.adapter, **settings))
        return answer(gen.chat(messages, args.adapter, **settings))

    return run
