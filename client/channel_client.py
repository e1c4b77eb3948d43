"""Closing behaviour shared by every SDK client: each owns `self.channel` and closes it on close()
or at the end of a `with` / `async with` block."""

from __future__ import annotations


class ChannelClient:
    """Base of the blocking clients."""

    channel = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncChannelClient:
    """Base of the asyncio clients."""

    channel = None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
