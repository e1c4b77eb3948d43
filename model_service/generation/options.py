"""Generation settings of model_service: flags and MODEL_SERVICE_* variables (no torch import here)."""

from splitserve_common.settings import Option

GENERATION_OPTIONS = [
    Option("gen-max-sequences", 64, "generation: most sequences in the running batch", int),
    Option("gen-max-tokens", 65536, "generation: most positions (prompt + max_new_tokens) reserved by the running "
           "sequences together", int),
    Option("gen-max-waiting", 1024, "generation: most requests queued for a slot before RESOURCE_EXHAUSTED", int),
    Option("gen-max-beams", 8, "generation: largest num_beams a request may ask for (beam search runs apart from "
           "the continuous batch, one request at a time on the model's worker)", int),
    Option("gen-stream-interval", 0, "generation: tokens per streamed message after the first, which always goes "
           "out at once; 0 = adapt to the load: 1 up to 7 running sequences, then 1 more per 4 (at most 8)", int),
    Option("gen-torch-threads", 0, "generation: torch threads of the decode steps; 0 = measure and keep the faster of "
           "1 and the model worker's threads (one is faster when other processes share the cores)", int),
    Option("gen-lanes", 1, "generation: decode batches (lanes) stepping at once, each on its own forward worker with "
           "that worker's torch threads when several are busy; 1 = one batch (best on a shared node), 0 = one per "
           "forward worker (more tokens/s at many streams on an idle node)", int),
    Option("gen-onednn-matmuls", True, "generation: on CPU, run the continuous batch's fp32 matrix products on "
           "oneDNN (AVX-512 where the CPU has it) instead of torch's default BLAS (MKL: its AVX2 path on AMD CPUs); "
           "still fp32, the last bits differ", bool),
    Option("gen-fused-gelu", True, "generation: run transformers' NewGELUActivation (GPT-2's gelu_new, 8 elementwise "
           "operators) as torch's one fused tanh GELU in the continuous batch's passes; the same formula, the last "
           "bits differ", bool),
]
