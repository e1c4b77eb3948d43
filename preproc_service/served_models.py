"""Which model a request's `model` field names: the served model, or one of its loaded adapters.

OpenAI-shaped requests (Chat, Complete, Embeddings; both doors) carry `model`. It must be the
served model's name (then `adapter` chooses, as before) or the name of a loaded adapter, which
then answers the request (as vLLM serves LoRA modules). Anything else is NOT_FOUND: a client
that thinks it talks to another model must hear so, not get this one's answer under that name.
"""

from __future__ import annotations

import logging

from splitserve_common.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)


async def adapter_names(dep, refresh: bool = False) -> list[str]:
    """The loaded adapters model_service reported; `refresh` asks it again (adapters load at run time)."""
    info = dep.info
    if refresh:
        try:
            return list((await dep.model.metadata()).adapters)
        except Exception:  # noqa: BLE001 - fall back to what the last handshake said
            log.debug("adapter list refresh failed", exc_info=True)
    return list(info.adapters) if info else []


async def resolve_model(dep, model: str, adapter: str = "") -> tuple[str, str]:
    """(model name to answer with, adapter to use) for a request's `model` and `adapter` fields."""
    served = dep.model_name
    if not model or model == served:
        return served, adapter
    if model in await adapter_names(dep) or model in await adapter_names(dep, refresh=True):
        if adapter and adapter != model:
            raise InvalidArgument(f"model '{model}' names an adapter, but the request's adapter is '{adapter}'")
        return model, model
    adapters = await adapter_names(dep)
    known = ", ".join(f"'{name}'" for name in [served, *adapters])
    raise NotFound(f"The model '{model}' does not exist: this server serves {known}")
