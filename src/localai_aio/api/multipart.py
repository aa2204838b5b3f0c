"""Reading multipart uploads part by part, counting bytes against the upload limit as they arrive,
so an oversized body is refused without being read whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from localai_aio import keys
from localai_aio.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

CHUNK = 1 << 16
MALFORMED = (ValueError, AssertionError, LookupError, HttpProcessingError)


class Upload:
    def __init__(self, request: web.Request):
        if request.content_type != "multipart/form-data":
            raise UnsupportedMediaType(f"Content-Type must be multipart/form-data, not '{request.content_type}'")
        self.request = request
        self.limit = request.app[keys.SETTINGS].upload_limit_bytes
        self.received = 0

    async def parts(self) -> AsyncIterator[BodyPartReader]:
        try:
            reader = await self.request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, BodyPartReader):
                    yield part
        except MALFORMED as exc:
            raise InvalidRequest(f"The multipart body is malformed: {exc}") from None

    async def chunks(self, part: BodyPartReader) -> AsyncIterator[bytes]:
        try:
            while chunk := await part.read_chunk(CHUNK):
                self.received += len(chunk)
                if self.received > self.limit:
                    raise PayloadTooLarge(f"The upload is larger than the limit of "
                                          f"{self.request.app[keys.SETTINGS].upload_limit:g} MB")
                yield chunk
        except MALFORMED as exc:
            raise InvalidRequest(f"The multipart body is malformed: {exc}") from None

    async def read(self, part: BodyPartReader) -> bytes:
        return b"".join([chunk async for chunk in self.chunks(part)])
