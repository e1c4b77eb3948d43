"""Generation on the preproc side: prompts in, text out as the model's tokens arrive.

detokenizer.py: incremental detokenization (never a broken character, never a lost space);
text_filters.py: stop strings on decoded text, whitespace collapsing, both streaming;
request_params.py: request parameters -> the model's GenerationSettings (MLflow precedence);
stream.py: one model stream turned into text pieces; handlers.py: the tasks and the
llm/v1 (OpenAI-shaped) answers. `GenerationHandlers` is what preproc's servicer calls.
"""

from preproc_service.generation.handlers import GenerationHandlers

__all__ = ["GenerationHandlers"]
