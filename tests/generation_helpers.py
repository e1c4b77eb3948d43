"""Shared pieces of the generation tests and benchmark: tiny generative models on disk, in-process
reference generation, and stubs for both services."""

from __future__ import annotations

from pathlib import Path

import grpc

from tests import model_factory as mf

BUILDERS = {"gpt2": mf.build_gpt2, "llama": mf.build_llama, "t5": mf.build_t5}


def save_generative(root: Path, kind: str = "gpt2", **mlmodel) -> Path:
    """A tiny generative model in MLflow's components layout (text-generation or text2text-generation)."""
    model, tokenizer = BUILDERS[kind]()
    if kind == "t5":
        return mf.save_components(root, model, tokenizer, "text2text-generation",
                                  instance_type="Text2TextGenerationPipeline", **mlmodel)
    return mf.save_components(root, model, tokenizer, "text-generation", instance_type="TextGenerationPipeline",
                              **mlmodel)


def reference_generate(model, tokenizer, prompt_ids, **settings) -> list[int]:
    """In-process `model.generate` for one prompt: the generated ids only."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), **settings)
    start = 1 if model.config.is_encoder_decoder else len(prompt_ids)
    return out[0, start:].tolist()


def generation_stub(address: str):
    from splitserve_pb import generation_pb2_grpc

    return generation_pb2_grpc.GenerationStub(grpc.insecure_channel(address))


def preproc_stub(address: str):
    from splitserve_pb import preproc_pb2_grpc

    return preproc_pb2_grpc.PreprocStub(grpc.insecure_channel(address))


def _transparent_gpt2(tokenizer, width: int, n_positions: int):
    """A one-block GPT-2 whose block adds nothing (zero output projections), with an untied LM head:
    the hidden state is just token embedding + position embedding, which the caller sets."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    width = ((width + 3) // 4) * 4
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=width, n_layer=1, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wte.weight.zero_()
        model.lm_head.weight.zero_()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.eos_token_id)
    return model


def positional_gpt2(script: list[int], prompt_len: int, n_positions: int = 96):
    """A real GPT-2 whose weights make greedy decoding after a `prompt_len`-token prompt produce
    `script`, then eos. Position p's embedding is a scaled unit vector e_p; the LM head maps
    e_p to the token that follows position p. Returns (model, tokenizer)."""
    import torch

    tokenizer = mf.bytelevel_bpe_tokenizer()
    model = _transparent_gpt2(tokenizer, n_positions, n_positions)
    following = {prompt_len - 1 + k: tok for k, tok in enumerate(script)}
    with torch.no_grad():
        model.transformer.wpe.weight[torch.arange(n_positions), torch.arange(n_positions)] = 10.0
        for pos in range(n_positions):
            model.lm_head.weight[following.get(pos, tokenizer.eos_token_id), pos] = 1.0
    return model, tokenizer
