"""AdapterRegistry in process: per-row adapters in one batch against PeftModel, refusals, clean unload."""

from __future__ import annotations

import copy
import json
import shutil

import grpc
import pytest
import torch

from model_service.adapters import BASE, AdapterRegistry
from splitserve_common.errors import ServiceError
from tests import adapter_helpers as ah
from tests import model_factory as mf

SENTENCES = mf.SENTENCES


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    base, tok = mf.build_encoder("text-classification")
    dirs = ah.save_adapters(base, tmp_path_factory.mktemp("enc_adapters"), ah.ENCODER_ADAPTERS)
    served = copy.deepcopy(base)
    registry = AdapterRegistry(served)
    for name, path in dirs.items():
        registry.load(name, path)
    return {"base": base, "tok": tok, "dirs": dirs, "served": served, "registry": registry,
            "refs": ah.reference_models(base, dirs)}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    base, tok = mf.build_gpt2()
    dirs = ah.save_adapters(base, tmp_path_factory.mktemp("gpt2_adapters"), ah.GPT2_ADAPTERS)
    served = copy.deepcopy(base)
    registry = AdapterRegistry(served)
    for name, path in dirs.items():
        registry.load(name, path)
    return {"base": base, "tok": tok, "dirs": dirs, "served": served, "registry": registry,
            "refs": ah.reference_models(base, dirs)}


def status_of(excinfo) -> grpc.StatusCode:
    assert isinstance(excinfo.value, ServiceError)
    return excinfo.value.code


def test_list_describes_each_adapter(encoder):
    infos = {i.name: i for i in encoder["registry"].list()}
    assert sorted(infos) == ["alpha", "beta", "gamma"]
    beta = infos["beta"]
    assert (beta.method, beta.rank, beta.target_modules) == ("LORA", 4, ("dense", "key", "query"))
    assert beta.source == str(encoder["dirs"]["beta"])
    # weight bytes = the tensors in the adapter file (float32)
    from safetensors.torch import load_file
    saved = load_file(str(encoder["dirs"]["beta"] / "adapter_model.safetensors"))
    assert beta.weight_bytes == sum(t.numel() * 4 for t in saved.values()) > 0


def test_mixed_encoder_batch_matches_peft_per_row(encoder):
    rows = ["alpha", "", "gamma", "beta", "alpha"]
    enc = encoder["tok"](SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        with encoder["registry"].use(rows):
            mixed = encoder["served"](**enc).logits
        for i, name in enumerate(rows):
            ref = encoder["refs"][name]
            single = {k: v[i:i + 1, : int(enc["attention_mask"][i].sum())] for k, v in enc.items()}
            expected = ref(**single).logits[0]
            torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=1e-4)
        # the adapters really change the answer, so the comparison above means something
        base_logits = encoder["base"](**enc).logits
    for i, name in enumerate(rows):
        assert (mixed[i] - base_logits[i]).abs().max() > (1e-3 if name else -1)


def test_single_name_and_base_outside_use(encoder):
    enc = encoder["tok"](SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.inference_mode():
        with encoder["registry"].use("gamma"):
            got = encoder["served"](**enc).logits
        expected = encoder["refs"]["gamma"](**enc).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        # no use() block (or only base rows): the base model, adapters loaded or not
        peft_gamma = encoder["refs"]["gamma"]
        with peft_gamma.disable_adapter():
            disabled = peft_gamma(**enc).logits
        torch.testing.assert_close(encoder["served"](**enc).logits, disabled, atol=1e-6, rtol=0)
        with encoder["registry"].use([BASE, "", BASE]):
            torch.testing.assert_close(encoder["served"](**enc).logits, disabled, atol=1e-6, rtol=0)


def test_generation_with_mixed_rows_matches_peft_generate(gpt2):
    tok, pad = gpt2["tok"], gpt2["tok"].eos_token_id
    prompts = [tok(t)["input_ids"] for t in ["the river", "alice walks in", "the", "music of the"]]
    rows = ["beta", "", "alpha", "gamma"]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        with gpt2["registry"].use(rows):
            out = gpt2["served"].generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                          pad_token_id=pad)
        for i, name in enumerate(rows):
            ref = gpt2["refs"][name].generate(input_ids=torch.tensor([prompts[i]]), max_new_tokens=10,
                                              do_sample=False, pad_token_id=pad)
            assert out[i, width:].tolist() == ref[0, len(prompts[i]):].tolist(), name
    # three adapters and the base give four different continuations
    assert len({tuple(r) for r in out[:, width:].tolist()}) == 4


def test_unknown_adapter_is_not_found(encoder):
    with pytest.raises(ServiceError) as excinfo:
        encoder["registry"].check("delta")
    assert status_of(excinfo) == grpc.StatusCode.NOT_FOUND
    assert "delta" in excinfo.value.message and "alpha" in excinfo.value.message
    encoder["registry"].check("")  # the base model always exists


def write_ia3(base, path):
    from peft import IA3Config, get_peft_model

    config = IA3Config(target_modules=["query"], feedforward_modules=[])
    get_peft_model(copy.deepcopy(base), config).save_pretrained(path)


def write_adalora(base, path):
    from peft import AdaLoraConfig, get_peft_model

    get_peft_model(copy.deepcopy(base), AdaLoraConfig(target_modules=["query"], total_step=10)).save_pretrained(path)


def write_dora(base, path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query"], use_dora=True)).save_pretrained(path)


def write_other_width(base, path):
    """Same architecture and module names, another hidden size: shapes do not fit."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=base.config.vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    ah.save_lora(BertForSequenceClassification(cfg).eval(), path, 5, 2, ["query", "value"])


def write_gpt2_targets(base, path):
    """Target modules this BERT does not have."""
    gpt2, _ = mf.build_gpt2()
    ah.save_lora(gpt2, path, 5, 2, ["c_attn"])


def write_pickle_only(base, path):
    ah.save_lora(base, path, 5, 2, ["query"])
    from safetensors.torch import load_file

    torch.save(load_file(str(path / "adapter_model.safetensors")), path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()


def write_bad_config(base, path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{not json")


REFUSALS = [
    (write_gpt2_targets, grpc.StatusCode.INVALID_ARGUMENT, "not found in the base model"),
    (write_other_width, grpc.StatusCode.INVALID_ARGUMENT, "size mismatch"),
    (write_ia3, grpc.StatusCode.FAILED_PRECONDITION, "IA3"),
    (write_adalora, grpc.StatusCode.FAILED_PRECONDITION, "ADALORA"),
    (write_dora, grpc.StatusCode.FAILED_PRECONDITION, "DoRA"),
    (write_pickle_only, grpc.StatusCode.INVALID_ARGUMENT, "pickle"),
    (write_bad_config, grpc.StatusCode.INVALID_ARGUMENT, "not a valid PEFT config"),
]


@pytest.mark.parametrize("writer,code,words", REFUSALS, ids=[w.__name__ for w, _, _ in REFUSALS])
def test_incompatible_adapter_refused_and_model_unchanged(encoder, tmp_path, writer, code, words):
    served, registry = encoder["served"], encoder["registry"]
    keys_before = list(served.state_dict())
    path = tmp_path / "bad"
    writer(encoder["base"], path)
    with pytest.raises(ServiceError) as excinfo:
        registry.load("bad", path)
    assert status_of(excinfo) == code
    assert words in excinfo.value.message
    assert list(served.state_dict()) == keys_before
    assert registry.names() == ["alpha", "beta", "gamma"]
    # still serving the loaded adapters correctly
    enc = encoder["tok"](SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.inference_mode(), registry.use(["beta", ""]):
        got = served(**enc).logits
    with torch.inference_mode():
        torch.testing.assert_close(got[0], encoder["refs"]["beta"](**enc).logits[0], atol=1e-5, rtol=1e-4)


def test_bad_names_missing_dirs_and_duplicates(encoder, tmp_path):
    registry = encoder["registry"]
    cases = [("", encoder["dirs"]["alpha"], grpc.StatusCode.INVALID_ARGUMENT),
             ("__base__", encoder["dirs"]["alpha"], grpc.StatusCode.INVALID_ARGUMENT),
             ("a/b", encoder["dirs"]["alpha"], grpc.StatusCode.INVALID_ARGUMENT),
             ("new", tmp_path / "nowhere", grpc.StatusCode.NOT_FOUND),
             ("alpha", encoder["dirs"]["beta"], grpc.StatusCode.FAILED_PRECONDITION)]
    for name, path, code in cases:
        with pytest.raises(ServiceError) as excinfo:
            registry.load(name, path)
        assert status_of(excinfo) == code, (name, excinfo.value.message)
    with pytest.raises(ServiceError) as excinfo:
        registry.unload("nowhere")
    assert status_of(excinfo) == grpc.StatusCode.NOT_FOUND


def test_lease_makes_unload_wait_and_blocks_new_requests(encoder, tmp_path):
    registry = encoder["registry"]
    path = shutil.copytree(encoder["dirs"]["alpha"], tmp_path / "copy")
    registry.load("leased", path)
    with registry.lease("leased") as row_name:
        assert row_name == "leased" and registry.in_use("leased") == 1
        registry.begin_unload("leased")
        with pytest.raises(ServiceError) as excinfo:
            registry.check("leased")  # draining: new requests are refused
        assert status_of(excinfo) == grpc.StatusCode.NOT_FOUND
    assert registry.in_use("leased") == 0
    registry.unload("leased")
    assert "leased" not in registry.names()


def test_unload_all_restores_the_base_model(tmp_path):
    base, tok = mf.build_encoder("text-classification")
    dirs = ah.save_adapters(base, tmp_path, ah.ENCODER_ADAPTERS)
    served = copy.deepcopy(base)
    keys, count = list(served.state_dict()), ah.parameter_count(served)
    module_types = [type(m) for m in served.modules()]
    registry = AdapterRegistry(served)
    for name, path in dirs.items():
        registry.load(name, path)
    assert ah.parameter_count(served) > count
    for name in ["beta", "alpha", "gamma"]:
        assert registry.unload(name).name == name
    assert ah.parameter_count(served) == count
    assert list(served.state_dict()) == keys
    assert [type(m) for m in served.modules()] == module_types
    assert not hasattr(served, "peft_config")
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(served(**enc).logits, base(**enc).logits)
    # and it can be loaded again after a full unload
    info = registry.load("alpha", dirs["alpha"])
    assert info.rank == 2


def test_adapter_config_json_is_what_peft_wrote(encoder):
    cfg = json.loads((encoder["dirs"]["gamma"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "classifier" in cfg["modules_to_save"]
