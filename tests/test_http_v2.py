"""model_service's v2 REST door: tritonclient.http answers as tritonclient.grpc does.

One real model_service (text-classification, bearer token on) on loopback. tritonclient's
protobuf module defines inference.* too, so the clients run in their own process (as in
test_model_service.py); they save what they got and this test compares.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests import servers
from tests.model_service_helpers import reference
from tests.preproc_helpers import build_task_model

TOKEN = "v2-token"
TOL = 1e-5

CLIENTS = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

grpc_address, http_address, model, ids_path, out_path, token = sys.argv[1:7]
AUTH = {"authorization": f"Bearer {token}"}


def auth():
    return dict(AUTH)  # tritonclient.http adds its Inference-Header-Content-Length to the dict it is given


headers = AUTH
ids = np.load(ids_path)
g, h = tg.InferenceServerClient(grpc_address), th.InferenceServerClient(http_address)


def request(module, binary):
    extra = {} if binary is None else {"binary_data": binary}
    given = module.InferInput("input_ids", list(ids.shape), "INT64")
    given.set_data_from_numpy(ids, **extra)
    return [given], [module.InferRequestedOutput("logits", **extra)]


checks = {
    "live": [g.is_server_live(headers=headers), h.is_server_live()],
    "ready": [g.is_server_ready(headers=headers), h.is_server_ready()],
    "model_ready": [g.is_model_ready(model, headers=headers), h.is_model_ready(model, headers=headers)],
}
gm, hm = g.get_model_metadata(model, headers=headers, as_json=True), h.get_model_metadata(model, headers=headers)
checks["metadata"] = [[(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[kind]]
                      for meta in (gm, hm) for kind in ("inputs", "outputs")]
grpc_inputs, grpc_outputs = request(tg, None)
arrays = {"grpc": g.infer(model, grpc_inputs, outputs=grpc_outputs, headers=headers).as_numpy("logits")}
for binary in (True, False):
    inputs, outputs = request(th, binary)
    result = h.infer(model, inputs, outputs=outputs, headers=auth(), request_id="r-1")
    arrays[f"http_{'binary' if binary else 'json'}"] = result.as_numpy("logits")
    checks[f"id_{binary}"] = result.get_response()["id"]
everything = h.infer(model, request(th, True)[0], headers=auth())  # no outputs named: all, in binary
checks["all_outputs"] = sorted(o["name"] for o in everything.get_response()["outputs"])
arrays["http_all"] = everything.as_numpy("logits")
for name, call in {"unknown_model": lambda: h.infer("nope", request(th, True)[0], headers=auth()),
                   "bad_dtype": lambda: h.infer(model, [th.InferInput("input_ids", [1, 2], "FP32")
                                                        .set_data_from_numpy(np.zeros((1, 2), np.float32))],
                                                headers=auth()),
                   "no_token": lambda: h.infer(model, request(th, True)[0])}.items():
    try:
        call()
        checks[name] = None
    except InferenceServerException as exc:
        checks[name] = [int(exc.status()), exc.message()]
np.savez(out_path, **arrays)
print(json.dumps(checks))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root, model, tokenizer = build_task_model(tmp_path_factory.mktemp("v2"), "text-classification")
    with servers.model_service(root, "--metrics-port", "0", "--auth-token", TOKEN) as ms:
        yield ms, root.name, model, tokenizer


def test_tritonclient_http_equals_grpc(served, tmp_path):
    ms, name, model, tokenizer = served
    ids = np.asarray([tokenizer("Alice walked to the river in Paris.")["input_ids"]], dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    done = subprocess.run([sys.executable, "-c", CLIENTS, ms.address, f"127.0.0.1:{ms.http_port}", name,
                           str(tmp_path / "ids.npy"), str(tmp_path / "out.npz"), TOKEN],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    checks = json.loads(done.stdout.strip().splitlines()[-1])
    arrays = np.load(tmp_path / "out.npz")
    assert checks["live"] == checks["ready"] == checks["model_ready"] == [True, True]
    grpc_inputs, grpc_outputs, http_inputs, http_outputs = checks["metadata"]
    assert (grpc_inputs, grpc_outputs) == (http_inputs, http_outputs)
    for kind in ("http_binary", "http_json", "http_all"):
        np.testing.assert_array_equal(arrays[kind], arrays["grpc"])
    np.testing.assert_allclose(arrays["grpc"], reference(model, {"input_ids": ids})["logits"], atol=TOL, rtol=TOL)
    assert checks["id_True"] == checks["id_False"] == "r-1"
    assert checks["all_outputs"] == ["logits"]  # no outputs named: the task's default, as on gRPC
    assert checks["unknown_model"][0] == 404 and "nope" in checks["unknown_model"][1]
    assert checks["bad_dtype"][0] == 400 and "input_ids" in checks["bad_dtype"][1]
    assert checks["no_token"][0] == 401


def test_rest_json_tensors_and_probes(served):
    ms, name, _model, tokenizer = served
    url = f"http://127.0.0.1:{ms.http_port}"
    ids = tokenizer("the old market")["input_ids"]
    body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, len(ids)], "data": [ids]}],
            "outputs": [{"name": "logits"}]}
    request = urllib.request.Request(f"{url}/v2/models/{name}/infer", json.dumps(body).encode(),
                                     {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        answer = json.loads(reply.read())
    (logits,) = answer["outputs"]
    assert logits["name"] == "logits" and logits["datatype"] == "FP32" and logits["shape"][0] == 1
    assert len(logits["data"]) == logits["shape"][0] * logits["shape"][1]  # flat, row-major
    # Probes need no token; everything else does.
    for probe in ("/v2/health/live", "/v2/health/ready"):
        with urllib.request.urlopen(url + probe, timeout=10) as reply:
            assert reply.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/v2/models/{name}", timeout=10)
    assert refused.value.code == 401 and "bearer" in json.loads(refused.value.read())["error"]
    body["inputs"][0]["data"] = [ids[:-1]]
    bad = urllib.request.Request(f"{url}/v2/models/{name}/infer", json.dumps(body).encode(),
                                 {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(bad, timeout=10)
    assert caught.value.code == 400 and "input_ids" in json.loads(caught.value.read())["error"]
