"""The task registry: everything either service needs to know about a pipeline task, in one table.

Per task: the transformers auto class model_service loads when MLmodel names no model class,
the pipeline's other names (aliases), the model outputs its postprocess needs (returned when a
request names none), the pipeline's own parameter defaults (the lowest layer of MLflow's
precedence, see preproc_service/precedence.py), the preproc RPCs that serve it, and its preproc
handler: a module of `preproc_service.tasks`, or "generation" for the generation handlers.

`spec(name)` accepts canonical names, aliases and `translation_xx_to_yy`; unknown tasks give None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

GENERATION_RPCS = ("GenerateText", "GenerateTextStream", "Chat", "ChatStream", "Complete", "CompleteStream")

# preproc-side generation options (MLflow's own keys and the pipeline's text options). The sampling
# knobs have no preproc default: model_service applies generation_config.json, then greedy decoding.
_GENERATION_DEFAULTS = {"return_full_text": True, "include_prompt": None, "collapse_whitespace": False, "stop": []}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    auto_class: str                      # transformers auto class of its head ("": the config's architecture says)
    aliases: tuple[str, ...] = ()
    default_outputs: tuple[str, ...] = ()
    pipeline_defaults: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    rpcs: tuple[str, ...] = ()           # splitserve.v1.Preproc methods that serve this task
    handler: str = ""                    # preproc handler: tasks module name, "generation", "" for none
    generation: str = ""                 # "causal" | "seq2seq" for generation tasks, else ""

    @property
    def generates(self) -> bool:
        return bool(self.generation)


def _spec(name, auto_class, *, defaults=None, **kwargs) -> TaskSpec:
    return TaskSpec(name, auto_class, pipeline_defaults=MappingProxyType(dict(defaults or {})), **kwargs)


def _seq2seq(name: str) -> TaskSpec:
    return _spec(name, "AutoModelForSeq2SeqLM", defaults=_GENERATION_DEFAULTS, rpcs=GENERATION_RPCS,
                 handler="generation", generation="seq2seq")


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    _spec("text-classification", "AutoModelForSequenceClassification", aliases=("sentiment-analysis",),
          default_outputs=("logits",), rpcs=("Classify",), handler="text_classification",
          defaults={"function_to_apply": None, "top_k": None, "truncation": True}),
    _spec("token-classification", "AutoModelForTokenClassification", aliases=("ner",),
          default_outputs=("logits",), rpcs=("ClassifyTokens",), handler="token_classification",
          defaults={"aggregation_strategy": "none", "ignore_labels": ["O"], "truncation": True}),
    _spec("fill-mask", "AutoModelForMaskedLM", default_outputs=("logits",), rpcs=("FillMask",),
          handler="fill_mask", defaults={"top_k": 5, "targets": None, "truncation": True}),
    # transformers 4.x QuestionAnsweringPipeline defaults (its preprocess/postprocess signatures).
    _spec("question-answering", "AutoModelForQuestionAnswering", default_outputs=("start_logits", "end_logits"),
          rpcs=("AnswerQuestion",), handler="question_answering",
          defaults={"top_k": 1, "doc_stride": None, "max_answer_len": 15, "max_seq_len": None,
                    "max_question_len": 64, "handle_impossible_answer": False, "align_to_words": True}),
    _spec("zero-shot-classification", "AutoModelForSequenceClassification", default_outputs=("logits",),
          rpcs=("ZeroShotClassify",), handler="zero_shot_classification",
          defaults={"candidate_labels": None, "hypothesis_template": "This example is {}.", "multi_label": False}),
    _spec("feature-extraction", "AutoModel", default_outputs=("last_hidden_state",), rpcs=("Embed", "Embeddings"),
          handler="feature_extraction",
          defaults={"pooling": None, "normalize": None, "float16": False, "truncation": True}),
    # model_service only: pooled vectors (model_service/shaping.py's derived output).
    _spec("sentence-similarity", "AutoModel", default_outputs=("sentence_embedding",)),
    _spec("text-generation", "AutoModelForCausalLM", default_outputs=("logits",), defaults=_GENERATION_DEFAULTS,
          rpcs=GENERATION_RPCS, handler="generation", generation="causal"),
    _seq2seq("text2text-generation"),
    _seq2seq("summarization"),
    _seq2seq("translation"),  # also translation_xx_to_yy
    _spec("audio-classification", "AutoModelForAudioClassification", default_outputs=("logits",),
          rpcs=("ClassifyAudio",), handler="audio_classification", defaults={"top_k": None, "function_to_apply": None}),
    # CTC or encoder-decoder: MLmodel's pipeline_model_type or the config's architecture says which.
    _spec("automatic-speech-recognition", "", default_outputs=("logits",), rpcs=("Transcribe", "TranscribeStream"),
          handler="speech_recognition",
          defaults={"chunk_length_s": 0, "stride_length_s": None, "return_timestamps": None, "language": None,
                    "task": None}),
    _spec("table-question-answering", "AutoModelForTableQuestionAnswering",
          default_outputs=("logits", "logits_aggregation"), rpcs=("AnswerTableQuestion",),
          handler="table_question_answering", defaults={"sequential": False, "truncation": "drop_rows_to_fit"}),
]}

_ALIASES = {alias: spec.name for spec in TASKS.values() for alias in spec.aliases}


def canonical(task: str | None) -> str:
    """The registry's name for `task` (aliases resolved); other names are returned unchanged."""
    return _ALIASES.get(task or "", task or "")


def spec(task: str | None) -> TaskSpec | None:
    """The registry entry for a task name, alias or `translation_xx_to_yy`; None when unknown."""
    name = canonical(task)
    return TASKS.get(name) or TASKS.get(name.split("_")[0])


def same_model(a: str, b: str) -> bool:
    """Both tasks are served by the same model head (e.g. zero-shot runs on a sequence classifier)."""
    sa, sb = spec(a), spec(b)
    return canonical(a) == canonical(b) or (sa is not None and sb is not None and bool(sa.auto_class)
                                            and sa.auto_class == sb.auto_class)
