"""`splitserve` / `python -m client`: call preproc_service from the shell, JSON out.

    splitserve predict "I love this"                   # whatever task the deployment serves
    splitserve predict --labels travel,music "a trip"  # zero-shot
    splitserve predict --context "Alice lives in Paris." "Where does Alice live?"
    splitserve predict clip.wav other.mp3              # audio-classification / speech recognition: files
    splitserve predict --table '{"city": ["paris"]}' "which city?"   # table-question-answering
    echo "one text per line" | splitserve embed
    splitserve tokenize "hello world"; splitserve info
    splitserve generate "Once upon a time"; splitserve chat "Hi"   # client/generation_cli.py

Texts come from the arguments, else one per line from stdin. One JSON line per input on stdout
(`--format`), errors as one JSON line on stderr (client/cli_common.py). Each subcommand is a
`configure(parser)` that adds its arguments and returns its `run(client, args)`; COMMANDS lists them.
"""

from __future__ import annotations

import argparse

from client import generation_cli
from client.cli_common import UsageError, add_common_flags, entry, read_texts
from client.preproc_client import PreprocClient, _channel_options

GENERATION_TASKS = ("text-generation", "text2text-generation", "summarization", "translation")
AUDIO_TASKS = ("audio-classification", "automatic-speech-recognition")


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def _texts_arg(parser) -> None:
    parser.add_argument("texts", nargs="*", help="input texts (default: one per line from stdin)")


def _truncation_arg(parser) -> None:
    parser.add_argument("--no-truncation", dest="truncation", action="store_false", default=None,
                        help="refuse texts longer than the model's limit instead of truncating them")


def _predict(parser):
    _texts_arg(parser)
    parser.add_argument("--top-k", type=int,
                        help="text-classification: labels per text; fill-mask: candidates per mask; "
                             "question-answering: answers per question (default: the model's)")
    parser.add_argument("--all-labels", action="store_true", default=None,
                        help="text-classification: every label, best first (the pipeline's top_k=None)")
    parser.add_argument("--function-to-apply", choices=["softmax", "sigmoid", "none"],
                        help="text-classification: scores from logits (default: the model's problem type)")
    parser.add_argument("--text-pair", action="append", help="text-classification: second segment, per text "
                        "(repeat once per text)")
    parser.add_argument("--aggregation-strategy", choices=["none", "simple", "first", "average", "max"],
                        help="token-classification: how tokens merge into entities (default: none)")
    parser.add_argument("--ignore-labels", help="token-classification: comma-separated labels to drop "
                        "(default: O)")
    parser.add_argument("--targets", help="fill-mask: comma-separated candidate tokens")
    parser.add_argument("--context", help="question-answering: the context; the texts are questions")
    parser.add_argument("--doc-stride", type=int, help="question-answering: overlap of context windows in tokens")
    parser.add_argument("--max-answer-len", type=int, help="question-answering: longest answer in tokens")
    parser.add_argument("--handle-impossible-answer", action="store_true", default=None,
                        help="question-answering: allow the empty answer")
    parser.add_argument("--labels", help="zero-shot-classification: comma-separated candidate labels")
    parser.add_argument("--hypothesis-template", help="zero-shot-classification: e.g. 'This example is {}.'")
    parser.add_argument("--multi-label", action="store_true", default=None,
                        help="zero-shot-classification: score each label on its own")
    parser.add_argument("--table", help="table-question-answering: the table as JSON ({column: [cells]}) or "
                        "@FILE; the texts are queries")
    parser.add_argument("--sequential", action="store_true", default=None,
                        help="table-question-answering: each query sees the previous answer (SQA)")
    parser.add_argument("--chunk-length-s", type=float,
                        help="speech recognition: cut audio into chunks of this many seconds")
    parser.add_argument("--stride-length-s", type=float, help="speech recognition: overlap on each chunk side")
    parser.add_argument("--return-timestamps", choices=["char", "word", "true"],
                        help="speech recognition: timed characters or words (CTC), timed segments (Whisper: true)")
    parser.add_argument("--language", help="speech recognition (Whisper): the language spoken (unset: detected)")
    parser.add_argument("--task", choices=["transcribe", "translate"], help="speech recognition (Whisper)")
    parser.add_argument("--max-new-tokens", type=int, help="speech recognition (Whisper): tokens per segment")
    parser.add_argument("--num-beams", type=int, help="speech recognition (Whisper): beam width (default 5)")
    _truncation_arg(parser)

    def run(client: PreprocClient, args):
        texts = read_texts(args)
        task = client.info().task
        if task in AUDIO_TASKS:  # the texts are audio files, sent as bytes
            clips = [_read_file(path) for path in texts]
            if task == "audio-classification":
                return client.classify_audio(clips, top_k=args.top_k, function_to_apply=args.function_to_apply)
            generation = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
            return client.transcribe(clips, chunk_length_s=args.chunk_length_s, stride_length_s=args.stride_length_s,
                                     return_timestamps=args.return_timestamps, language=args.language, task=args.task,
                                     generate_kwargs={k: v for k, v in generation.items() if v is not None})
        if task == "table-question-answering":
            if not args.table:
                raise UsageError("predict: table-question-answering needs --table JSON (or @FILE)")
            table = _read_file(args.table[1:]).decode() if args.table.startswith("@") else args.table
            return client.answer_table_question([(table, texts)], sequential=args.sequential)[0]
        if task == "text-classification":
            return client.classify(texts, args.text_pair, top_k=args.top_k, all_labels=args.all_labels,
                                   function_to_apply=args.function_to_apply, truncation=args.truncation)
        if task == "token-classification":
            return client.classify_tokens(texts, aggregation_strategy=args.aggregation_strategy,
                                          ignore_labels=_csv(args.ignore_labels), truncation=args.truncation)
        if task == "fill-mask":
            return client.fill_mask(texts, top_k=args.top_k, targets=_csv(args.targets), truncation=args.truncation)
        if task == "question-answering":
            return client.answer_question([(q, args.context or "") for q in texts], top_k=args.top_k,
                                          doc_stride=args.doc_stride, max_answer_len=args.max_answer_len,
                                          handle_impossible_answer=args.handle_impossible_answer)
        if task == "zero-shot-classification":
            return client.zero_shot_classify(texts, _csv(args.labels) or [], multi_label=args.multi_label,
                                             hypothesis_template=args.hypothesis_template)
        if task == "feature-extraction":
            return client.embed(texts, truncation=args.truncation)
        if task.startswith(GENERATION_TASKS):
            chat = " or `splitserve chat`" if task == "text-generation" else ""
            raise UsageError(f"predict: the service serves {task!r}, a generation task: use `splitserve generate`"
                             f"{chat}")
        raise UsageError(f"predict: the service serves {task!r}, which predict does not handle; "
                         "`splitserve info` shows what it serves")
    return run


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _embed(parser):
    _texts_arg(parser)
    parser.add_argument("--pooling", choices=["none", "mean", "cls", "max"],
                        help="none: one vector per token (default: the model's, e.g. sentence-transformers')")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="unit-length vectors (default: the model's)")
    parser.add_argument("--openai", action="store_true", help="answer in the llm/v1/embeddings (OpenAI) shape")

    def run(client: PreprocClient, args):
        texts = read_texts(args)
        if args.openai:
            return client.embeddings(texts)
        return client.embed(texts, pooling=args.pooling, normalize=args.normalize)
    return run


def _tokenize(parser):
    _texts_arg(parser)
    parser.add_argument("--no-special-tokens", dest="add_special_tokens", action="store_false", default=None,
                        help="leave out [CLS], [SEP], <s> and the like")

    def run(client: PreprocClient, args):
        return client.tokenize(read_texts(args), add_special_tokens=args.add_special_tokens)
    return run


def _info(parser):
    return lambda client, args: client.info()


# name -> (help, configure(parser) -> run(client, args) -> JSON-able result, or None when it wrote its own)
COMMANDS = {
    "predict": ("run the deployment's task on texts (task from the service's Info)", _predict),
    "embed": ("embedding vectors for texts (feature-extraction models)", _embed),
    "tokenize": ("token ids, tokens and character offsets of texts", _tokenize),
    "info": ("what the deployment serves: task, labels, limits, tokenizer", _info),
    "generate": ("generate text from a prompt (text-generation, text2text, summarization, translation); the "
                 "text streams to stdout", generation_cli.configure_generate),
    "chat": ("chat with the model (llm/v1/chat, the tokenizer's chat template)", generation_cli.configure_chat),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Call a splitserve preproc_service.")
    add_common_flags(parser, "SPLITSERVE_ADDRESS", "127.0.0.1:8011", "preproc_service")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(run=configure(sub_parser))
    return parser


def main(argv=None) -> int:
    return entry("splitserve", build_parser(), PreprocClient, argv, _channel_options())
