"""preproc_service: tokenizer + task pre/postprocessing on CPU, without torch."""
