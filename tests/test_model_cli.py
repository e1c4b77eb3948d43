"""`splitserve-model` (client/model_cli.py) against a real model_service on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests import model_factory, servers
from tests.adapter_helpers import TOKEN, management_flags, save_lora


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_cli")
    model, tokenizer = model_factory.build_encoder("text-classification", seed=11)
    model_dir = model_factory.save_components(root / "model", model, tokenizer, "text-classification")
    adapter_dir = save_lora(model, root / "adapter", seed=5, r=4, target_modules=["query", "value"])
    with servers.model_service(model_dir, *management_flags(root), log_dir=root / "logs") as service:
        yield {"address": service.address, "model": model, "tokenizer": tokenizer, "adapter": adapter_dir,
               "model_dir": model_dir}


def cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.model_cli", "--address", stack["address"], *args],
                          capture_output=True, text=True, timeout=120)


def test_health_and_metadata(stack):
    health = cli(stack, "health")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING", "live": True, "ready": True}
    metadata = json.loads(cli(stack, "metadata").stdout)
    assert metadata["task"] == "text-classification"
    assert "logits" in [o["name"] for o in metadata["outputs"]]


def test_infer_equals_in_process_forward(stack):
    ids = stack["tokenizer"](["Alice walked to the river."], return_tensors="np")["input_ids"].astype(np.int64)
    done = cli(stack, "infer", "--input", f"input_ids={json.dumps(ids.tolist())}", "--output", "logits")
    assert done.returncode == 0, done.stderr
    logits = json.loads(done.stdout)["outputs"]["logits"]
    with torch.inference_mode():
        expected = stack["model"](input_ids=torch.from_numpy(ids)).logits.numpy()
    assert logits["datatype"] == "FP32" and logits["shape"] == list(expected.shape)
    np.testing.assert_allclose(np.asarray(logits["data"]), expected, atol=1e-5)


def test_infer_reads_npy_files_and_parameters(stack, tmp_path):
    ids = stack["tokenizer"](["the old market", "Bob"], padding=True, return_tensors="np")
    np.save(tmp_path / "ids.npy", ids["input_ids"].astype(np.int32))
    mask = json.dumps(ids["attention_mask"].tolist())
    done = cli(stack, "infer", "--input", f"input_ids=@{tmp_path / 'ids.npy'}",
               "--input", f"attention_mask:INT32={mask}", "--output", "logits", "--param", "top_k=1")
    assert done.returncode == 0, done.stderr
    outputs = json.loads(done.stdout)["outputs"]
    assert sorted(outputs) == ["logits_topk_indices", "logits_topk_values"]
    assert outputs["logits_topk_values"]["shape"] == [2, 1]


def test_bad_input_names_the_status(stack):
    done = cli(stack, "infer", "--input", "input_ids=[[1, 2, 3]]", "--output", "no_such_output")
    assert done.returncode == 1
    error = json.loads(done.stderr.strip().splitlines()[-1])["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "no_such_output" in error["message"]
    unknown_type = cli(stack, "infer", "--input", "input_ids:INT5=[[1]]")
    assert unknown_type.returncode == 2 and "INT5" in unknown_type.stderr


def manage(stack, *args: str) -> subprocess.CompletedProcess:
    return cli(stack, "adapters", *args, "--adapter-token", TOKEN)


def test_adapters_load_list_unload(stack):
    loaded = manage(stack, "load", "tone", str(stack["adapter"]))
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["name"] == "tone"
    listed = [json.loads(line) for line in cli(stack, "adapters", "list").stdout.splitlines()]  # one per line
    assert [a["name"] for a in listed] == ["tone"] and listed[0]["method"] == "LORA"
    assert json.loads(manage(stack, "unload", "tone").stdout)["name"] == "tone"
    no_path = manage(stack, "load", "tone")
    assert no_path.returncode == 2 and no_path.stdout == ""
    assert "PATH is missing" in json.loads(no_path.stderr)["error"]["message"]
    missing = manage(stack, "unload", "tone")
    assert missing.returncode == 1
    assert json.loads(missing.stderr.strip().splitlines()[-1])["error"]["code"] == "NOT_FOUND"


def test_reserved_and_unknown_adapter_names(stack):
    reserved = manage(stack, "load", "base", str(stack["adapter"]))
    assert reserved.returncode == 1
    assert "reserved" in json.loads(reserved.stderr.strip().splitlines()[-1])["error"]["message"]
    # A default adapter that is not loaded stops the start-up, naming the flag.
    started = subprocess.run([sys.executable, "-m", "model_service", "--model-dir", str(stack["model_dir"]),
                              "--port", "0", "--http-port", "0",
                              "--metrics-port", "0", "--default-adapter", "nope"],
                             capture_output=True, text=True, timeout=180)
    assert started.returncode != 0
    assert "--default-adapter nope" in started.stderr and "unknown adapter 'nope'" in started.stderr
