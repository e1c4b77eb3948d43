"""model_service.loader in process: layouts, safety refusals, dtype, PEFT with the injected-LoRA base."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from model_service.loader import LoadError, LoadOptions, load
from tests import model_factory
from tests.servers import ROOT


@pytest.fixture(scope="module")
def tc(tmp_path_factory):
    """A text-classification model saved in the MLflow components layout."""
    root = tmp_path_factory.mktemp("loader")
    model, tokenizer = model_factory.build_encoder("text-classification", seed=5)
    return root, model_factory.save_components(root / "tc", model, tokenizer, "text-classification"), model, tokenizer


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


IDS = [[2, 10, 11, 12, 13, 3]]


def save_pickled(directory, model):
    """A save_pretrained directory with pickle weights (pytorch_model.bin) only."""
    directory.mkdir()
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def test_components_layout(tc):
    _, directory, model, _ = tc
    loaded = load(LoadOptions(str(directory)))
    assert loaded.task == "text-classification"
    assert loaded.architecture == "BertForSequenceClassification"
    assert loaded.weights_dir == directory / "model"
    np.testing.assert_allclose(logits(loaded.model, IDS), logits(model, IDS), atol=1e-6)


def test_pre_2_4_1_pipeline_dir(tc):
    root, directory, model, _ = tc
    old = root / "old"
    shutil.copytree(directory, old)
    (old / "model").rename(old / "pipeline")
    loaded = load(LoadOptions(str(old)))
    assert loaded.weights_dir == old / "pipeline"
    np.testing.assert_allclose(logits(loaded.model, IDS), logits(model, IDS), atol=1e-6)


def test_plain_dir_task_from_config_and_override(tc):
    root, _, model, tokenizer = tc
    plain = model_factory.save_plain(root / "plain", model, tokenizer)
    assert load(LoadOptions(str(plain))).task == "text-classification"
    assert load(LoadOptions(str(plain), task="zero-shot-classification")).task == "zero-shot-classification"


def test_dtype_from_mlmodel_and_flag(tc):
    root, directory, _, _ = tc
    bf16 = root / "bf16"
    shutil.copytree(directory, bf16)
    doc = yaml.safe_load((bf16 / "MLmodel").read_text())
    doc["flavors"]["transformers"]["torch_dtype"] = "torch.bfloat16"
    (bf16 / "MLmodel").write_text(yaml.safe_dump(doc))
    assert next(load(LoadOptions(str(bf16))).model.parameters()).dtype == torch.bfloat16
    loaded = load(LoadOptions(str(bf16), dtype="float32"))
    assert loaded.dtype == "float32" and next(loaded.model.parameters()).dtype == torch.float32


def test_pickle_weights_refused_unless_allowed(tc):
    root, _, model, tokenizer = tc
    pickled = save_pickled(root / "pickled", model)
    with pytest.raises(LoadError, match="--allow-pickle"):
        load(LoadOptions(str(pickled)))
    loaded = load(LoadOptions(str(pickled), allow_pickle=True))
    np.testing.assert_allclose(logits(loaded.model, IDS), logits(model, IDS), atol=1e-6)


def test_remote_code_refused_unless_trusted(tc):
    root, directory, _, _ = tc
    remote = root / "remote"
    shutil.copytree(directory, remote)
    config = json.loads((remote / "model" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomModel"}
    (remote / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="--trust-remote-code"):
        load(LoadOptions(str(remote)))


def test_local_base_model_path_and_flag(tc):
    root, directory, model, _ = tc
    base_only = root / "base-elsewhere"
    shutil.copytree(directory / "model", base_only)
    artifact = root / "no-weights"
    shutil.copytree(directory, artifact)
    shutil.rmtree(artifact / "model")
    with pytest.raises(LoadError, match="--base-model-path"):
        load(LoadOptions(str(artifact)))
    loaded = load(LoadOptions(str(artifact), base_model_path=str(base_only)))
    np.testing.assert_allclose(logits(loaded.model, IDS), logits(model, IDS), atol=1e-6)
    doc = yaml.safe_load((artifact / "MLmodel").read_text())
    doc["flavors"]["transformers"]["local_base_model_path"] = str(base_only)
    (artifact / "MLmodel").write_text(yaml.safe_dump(doc))
    assert load(LoadOptions(str(artifact))).weights_dir == base_only


def test_injected_lora_base_loads_like_peft_model(tmp_path):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    base, tokenizer = model_factory.build_encoder("text-classification", seed=11)
    peft_model = model_factory.build_lora(base, seed=2)
    directory = model_factory.save_peft_components(tmp_path / "peft", peft_model, tokenizer, "text-classification",
                                                   "TextClassificationPipeline")
    expected = logits(peft_model, IDS)
    loaded = load(LoadOptions(str(directory), merge_peft=True))
    np.testing.assert_allclose(logits(loaded.model, IDS), expected, atol=1e-5)
    assert loaded.peft_merged and not loaded.peft_dir
    # By default the adapter is left to model_service.adapters (served by name): the model is the clean base.
    unmerged = load(LoadOptions(str(directory)))
    assert unmerged.peft_dir == str(directory / "peft") and not unmerged.peft_merged
    with peft_model.disable_adapter():
        np.testing.assert_allclose(logits(unmerged.model, IDS), logits(peft_model, IDS), atol=1e-5)
    # What a naive loader gets: base_layer weights missing, randomly initialised -> different outputs.
    naive = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(directory / "model"),
                                      str(directory / "peft"))
    assert np.abs(logits(naive, IDS) - expected).max() > 1e-3


def test_minilm_sentence_transformers_layout():
    loaded = load(LoadOptions(str(model_factory.minilm_dir())))
    assert loaded.task == "feature-extraction"
    assert loaded.pooling.as_dict() == {"mode": "mean", "normalize": True}
    assert loaded.max_positions == 512 and loaded.pad_token_id == 0


def test_refusal_at_startup_names_the_flag(tc):
    root, _, model, tokenizer = tc
    pickled = save_pickled(root / "pickled-cli", model)
    done = subprocess.run([sys.executable, "-m", "model_service", "--model-dir", str(pickled), "--port", "0",
                           "--http-port", "0", "--metrics-port", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert "--allow-pickle" in done.stderr


def test_every_setting_is_a_flag_and_env_var_with_default_in_help(monkeypatch):
    from model_service import cli
    from splitserve_common.settings import build_parser

    help_text = " ".join(build_parser("model-service", "", cli.OPTIONS, cli.ENV_PREFIX).format_help().split())
    for opt in cli.MODEL_OPTIONS:
        assert f"--{opt.name}" in help_text
        assert f"env {opt.env_var(cli.ENV_PREFIX)}; default: {opt.default!r}" in help_text
    monkeypatch.setenv("MODEL_SERVICE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("MODEL_SERVICE_MODEL_DIR", "/models/x")
    args = cli.parse_args(["--max-wait-us", "5"])
    assert (args.max_batch_size, args.max_wait_us, args.model_dir, args.port) == (7, 5, "/models/x", 8001)
