"""TLS, mutual TLS and the bearer token on every hop (issue 6, item 7).

client --mTLS+token--> preproc --mTLS+token--> model_service, with certificates made here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest

from client.preproc_client import PreprocClient
from splitserve_common.channels import ChannelSecurity, sync_channel
from splitserve_common.health_probe import check
from splitserve_pb import open_inference_pb2 as v2
from splitserve_pb import open_inference_pb2_grpc as v2_grpc
from splitserve_pb import preproc_pb2, preproc_pb2_grpc
from tests.ops_helpers import make_pki, sentences, tiny_model
from tests.servers import START_SECONDS, service

TOKEN = "test-token-3f9a"


def _server_flags(pki) -> list[str]:
    return ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
            "--tls-client-ca", str(pki.ca), "--auth-token", TOKEN]


def _wait_serving(handle, security: ChannelSecurity, timeout: float = START_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise RuntimeError(f"service exited with {handle.proc.returncode}:\n{handle.log()}")
        if check(handle.address, security, timeout=1.0) == "SERVING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"{handle.address} not SERVING over mTLS:\n{handle.log()[-3000:]}")


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    good = ChannelSecurity(ca=str(pki.ca), cert=str(pki.client.cert), key=str(pki.client.key), token=TOKEN)
    model_dir = tiny_model("classifier")
    with service("model_service", ["--model-dir", str(model_dir), "--metrics-port", "0", *_server_flags(pki)],
                 wait=False) as model:
        _wait_serving(model, good)
        hop = ["--model-service-tls-ca", str(pki.ca), "--model-service-tls-cert", str(pki.client.cert),
               "--model-service-tls-key", str(pki.client.key), "--model-service-token", TOKEN]
        with service("preproc_service", ["--model-dir", str(model_dir), "--model-service", model.address,
                                         "--metrics-port", "0", *_server_flags(pki), *hop], wait=False) as preproc:
            _wait_serving(preproc, good)
            yield {"pki": pki, "good": good, "model": model.address, "preproc": preproc.address,
                   "preproc_http": preproc.http_port, "model_http": model.http_port}


def _classify(address: str, security: ChannelSecurity):
    with sync_channel(address, security) as channel:
        return preproc_pb2_grpc.PreprocStub(channel).Classify(preproc_pb2.ClassifyRequest(texts=["the river"]),
                                                             timeout=10)


def _model_metadata(address: str, security: ChannelSecurity):
    with sync_channel(address, security) as channel:
        return v2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(v2.ModelMetadataRequest(name=""), timeout=10)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value.code()


def test_mutual_tls_and_token_on_every_hop(secure_stack):
    # The client SDK over mTLS with the token; preproc can only answer if its own mTLS+token
    # hop to model_service works too.
    texts = sentences(3)
    with PreprocClient(secure_stack["preproc"], channel=sync_channel(secure_stack["preproc"],
                                                                     secure_stack["good"])) as client:
        results = client.classify(texts)
    assert len(results) == len(texts)
    assert all(item for item in results)
    assert _model_metadata(secure_stack["model"], secure_stack["good"]).parameters["task"].string_param


@pytest.mark.parametrize("target", ["preproc", "model"])
def test_client_without_the_right_certificate_is_refused(secure_stack, target):
    pki, address = secure_stack["pki"], secure_stack[target]
    call = _classify if target == "preproc" else _model_metadata
    rogue = ChannelSecurity(ca=str(pki.ca), cert=str(pki.rogue_client.cert), key=str(pki.rogue_client.key),
                            token=TOKEN)
    no_client_cert = ChannelSecurity(ca=str(pki.ca), token=TOKEN)
    plaintext = ChannelSecurity(token=TOKEN)
    for security in (rogue, no_client_cert, plaintext):
        assert _code(lambda s=security: call(address, s)) == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the server's CA refuses the server as well.
    untrusting = ChannelSecurity(ca=str(pki.rogue_client.cert), cert=str(pki.client.cert),
                                 key=str(pki.client.key), token=TOKEN)
    assert _code(lambda: call(address, untrusting)) == grpc.StatusCode.UNAVAILABLE
    # ... while the right certificate still gets through (the refusals did not take the server down).
    call(address, secure_stack["good"])


@pytest.mark.parametrize("target", ["preproc", "model"])
def test_missing_or_wrong_token_is_unauthenticated(secure_stack, target):
    pki, address = secure_stack["pki"], secure_stack[target]
    call = _classify if target == "preproc" else _model_metadata
    certified = dict(ca=str(pki.ca), cert=str(pki.client.cert), key=str(pki.client.key))
    for token in ("", "wrong-token", TOKEN + "x"):
        security = ChannelSecurity(**certified, token=token)
        with pytest.raises(grpc.RpcError) as failure:
            call(address, security)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in failure.value.details()
    # Health checks need no token (container and Kubernetes probes cannot send one).
    assert check(address, ChannelSecurity(**certified)) == "SERVING"


def test_streaming_calls_need_the_token_too(secure_stack):
    pki = secure_stack["pki"]
    no_token = ChannelSecurity(ca=str(pki.ca), cert=str(pki.client.cert), key=str(pki.client.key))
    request = preproc_pb2.PredictRequest(classify=preproc_pb2.ClassifyRequest(texts=["the river"]))
    with sync_channel(secure_stack["preproc"], no_token) as channel:
        stream = preproc_pb2_grpc.PreprocStub(channel).PredictStream(iter([request]), timeout=10)
        with pytest.raises(grpc.RpcError) as failure:
            list(stream)
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with sync_channel(secure_stack["preproc"], secure_stack["good"]) as channel:
        replies = list(preproc_pb2_grpc.PreprocStub(channel).PredictStream(iter([request]), timeout=10))
    assert len(replies) == 1


def test_cli_speaks_mtls_and_token(secure_stack):
    pki = secure_stack["pki"]
    base = [sys.executable, "-m", "client", "--address", secure_stack["preproc"], "--tls-ca", str(pki.ca),
            "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    ok = subprocess.run([*base, "--token", TOKEN, "info"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["task"] == "text-classification"
    refused = subprocess.run([*base, "info"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert json.loads(refused.stderr.strip().splitlines()[-1])["error"]["code"] == "UNAUTHENTICATED"


def _https(port: int, path: str, pki, body: dict | None = None, client_cert: bool = True, token: str = TOKEN):
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}",
                                     json.dumps(body).encode() if body is not None else None, headers)
    with urllib.request.urlopen(request, timeout=30, context=context) as reply:
        return reply.status, reply.read()


def test_http_doors_take_the_same_mtls_and_token(secure_stack):
    """Both HTTP doors serve HTTPS with the gRPC ports' certificate, client CA and token."""
    import ssl
    import urllib.error

    pki = secure_stack["pki"]
    status, body = _https(secure_stack["preproc_http"], "/splitserve.v1.Preproc/Classify", pki,
                          {"texts": ["a fine day"]})
    assert status == 200 and json.loads(body)["results"][0]["labels"]
    assert _https(secure_stack["model_http"], "/v2/health/ready", pki)[0] == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):  # no client certificate
        _https(secure_stack["preproc_http"], "/v1/models", pki, client_cert=False)
    with pytest.raises(urllib.error.HTTPError) as refused:  # certificate but no token
        _https(secure_stack["model_http"], "/v2/models/x", pki, token="")
    assert refused.value.code == 401
