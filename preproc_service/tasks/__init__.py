"""One module per encoder task, mirroring the transformers pipeline's preprocess/postprocess.

TASK_OF_METHOD says which task each preproc RPC serves; a deployment answers only its own task.
"""

ENCODER_TASKS = (
    "text-classification",
    "token-classification",
    "fill-mask",
    "question-answering",
    "zero-shot-classification",
    "feature-extraction",
    "audio-classification",
    "automatic-speech-recognition",
    "table-question-answering",
)

TASK_OF_METHOD = {
    "Classify": "text-classification",
    "ClassifyTokens": "token-classification",
    "FillMask": "fill-mask",
    "AnswerQuestion": "question-answering",
    "ZeroShotClassify": "zero-shot-classification",
    "Embed": "feature-extraction",
    "Embeddings": "feature-extraction",
    "ClassifyAudio": "audio-classification",
    "Transcribe": "automatic-speech-recognition",
    "TranscribeStream": "automatic-speech-recognition",
    "AnswerTableQuestion": "table-question-answering",
}
