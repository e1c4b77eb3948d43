"""splitserve_common/errors.py: a peer's failures become ours with the peer named; the rest pass."""

from __future__ import annotations

import grpc
import pytest

from splitserve_common.errors import DeadlineExceeded, Unavailable, peer_errors, status_of


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize("code, kind, message", [
    (grpc.StatusCode.UNAVAILABLE, Unavailable, "model service at m:1 is unavailable: connection refused"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, "model service at m:1 did not answer in time"),
])
def test_peer_unavailable_and_deadline_name_the_peer(code, kind, message):
    with pytest.raises(kind) as exc, peer_errors("model service at m:1"):
        raise _rpc_error(code, "connection refused")
    assert status_of(exc.value) == (code, message)


def test_other_peer_statuses_pass_through_unchanged():
    with pytest.raises(grpc.aio.AioRpcError) as exc, peer_errors("model service at m:1", "finish generating"):
        raise _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad ids")
    assert status_of(exc.value) == (grpc.StatusCode.INVALID_ARGUMENT, "bad ids")
