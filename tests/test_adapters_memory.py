"""Load, use and unload an adapter 50 times: memory and parameters return to where they started.

Tolerances: the served model's parameter count and state_dict keys must be exactly the base's
again; the server process's resident memory (VmRSS) may end at most RSS_TOLERANCE_MIB above its
value before the 50 cycles. The adapter used weighs ~10 MiB, so keeping even one adapter's
weights alive per cycle would add ~500 MiB; keeping nothing reads as noise below 1 MiB.
"""

from __future__ import annotations

import copy

import grpc
import numpy as np
import pytest
import torch

from model_service.adapters import AdapterRegistry
from splitserve_common import v2_codec
from splitserve_pb import adapters_pb2, adapters_pb2_grpc
from splitserve_pb import open_inference_pb2_grpc as v2_grpc
from tests import adapter_helpers as ah
from tests import model_factory as mf
from tests import servers

CYCLES = 50
RSS_TOLERANCE_MIB = 8.0


@pytest.fixture(scope="module")
def minilm_adapter(tmp_path_factory):
    from transformers import AutoModel, AutoTokenizer

    directory = mf.minilm_dir()
    base = AutoModel.from_pretrained(directory).eval()
    path = ah.save_lora(base, tmp_path_factory.mktemp("minilm_adapter") / "big", 7, 64,
                        ["query", "key", "value", "dense"])
    return directory, path, AutoTokenizer.from_pretrained(directory)


def embed_request(tok, adapter=""):
    enc = tok(["the river is long", "alice lives in paris"], padding=True, return_tensors="np")
    inputs = {name: enc[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    request = v2_codec.encode_request(inputs, ["last_hidden_state"], {"adapter": adapter or None})
    return request


def hidden(response) -> np.ndarray:
    return v2_codec.decode_response(response)["last_hidden_state"]


def test_server_rss_returns_after_50_load_use_unload_cycles(minilm_adapter):
    directory, path, tok = minilm_adapter
    with servers.model_service(directory, "--metrics-port", "0", "--torch-threads", "1",
                               *ah.management_flags(path.parent)) as server:
        channel = grpc.insecure_channel(server.address)
        adapters = adapters_pb2_grpc.AdaptersStub(channel)
        infer = v2_grpc.GRPCInferenceServiceStub(channel)
        base_out = hidden(infer.ModelInfer(embed_request(tok)))

        def cycle():
            info = adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="big", path=str(path)),
                                        metadata=ah.TOKEN_METADATA)
            loaded_rss = ah.rss_mib(server.proc.pid)
            out = hidden(infer.ModelInfer(embed_request(tok, "big")))
            adapters.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="big"), metadata=ah.TOKEN_METADATA)
            return info, loaded_rss, out

        for _ in range(3):  # warm-up: first-use allocations (imports, allocator pools) are not a leak
            info, _, out = cycle()
        assert info.weight_bytes > 10 * 2**20
        assert np.abs(out - base_out).max() > 1e-2  # the adapter is really applied
        start = ah.rss_mib(server.proc.pid)
        peaks = []
        for _ in range(CYCLES):
            _, loaded_rss, _ = cycle()
            peaks.append(loaded_rss)
        end = ah.rss_mib(server.proc.pid)
        print(f"server RSS: start {start:.1f} MiB, with adapter {max(peaks):.1f} MiB, "
              f"after {CYCLES} cycles {end:.1f} MiB")
        assert end - start < RSS_TOLERANCE_MIB
        # the measurement sees an adapter while it is loaded (so it would see a leak)
        assert max(peaks) - start > 5
        assert adapters.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters == []
        np.testing.assert_allclose(hidden(infer.ModelInfer(embed_request(tok))), base_out, atol=1e-6, rtol=0)


@pytest.mark.slow  # a soak: 50 load/unload cycles in-process
def test_parameters_and_modules_return_after_50_cycles(tmp_path):
    base, tok = mf.build_encoder("text-classification")
    dirs = ah.save_adapters(base, tmp_path, ah.ENCODER_ADAPTERS)
    served = copy.deepcopy(base)
    count, keys = ah.parameter_count(served), list(served.state_dict())
    registry = AdapterRegistry(served)
    enc = tok(["the river is good", "hello"], padding=True, return_tensors="pt")
    for i in range(CYCLES):
        name = list(dirs)[i % 3]
        registry.load(name, dirs[name])
        assert ah.parameter_count(served) > count
        with torch.inference_mode(), registry.use([name, ""]):
            served(**enc)
        registry.unload(name)
        assert ah.parameter_count(served) == count
    assert list(served.state_dict()) == keys
    with torch.inference_mode():
        assert torch.equal(served(**enc).logits, base(**enc).logits)
