"""Streamed generation with continuous batching (splitserve.v1.Generation).

sampling.py: settings, defaults and token choice; batch.py: the running batch and its KV
cache; scheduler.py: the step loop; service.py: the gRPC servicer and `add_to_server`.
"""
