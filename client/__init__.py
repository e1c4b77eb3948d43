"""splitserve client SDK and CLI. `client.tensor_client` talks to model_service directly (v2 tensors)."""

from client.tensor_client import AsyncTensorClient, InferResult, TensorClient

__all__ = ["AsyncTensorClient", "InferResult", "TensorClient"]
