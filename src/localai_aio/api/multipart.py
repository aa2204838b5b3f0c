"""Reading multipart uploads part by part, counting bytes against the upload limit as they arrive,
so an oversized body is refused without being read whole.

What counts is every byte of the body as received (decompressed, when the client sent it with
``Content-Encoding``): part headers and boundaries too, not only the parts' contents, so a body of
tiny parts cannot grow without bound. The number of parts is capped as well: OpenAI's forms have a
handful of fields, and each part costs parsing and memory however small it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from localai_aio.errors import InvalidRequest, UnsupportedMediaType, body_too_large
from localai_aio.server import keys

CHUNK = 1 << 16
MALFORMED = (ValueError, AssertionError, LookupError, HttpProcessingError)
#: Most parts one upload may have (the transcription form, the largest, has about ten).
MAX_PARTS = 64


class Upload:
    def __init__(self, request: web.Request):
        if request.content_type != "multipart/form-data":
            raise UnsupportedMediaType(f"Content-Type must be multipart/form-data, not '{request.content_type}'")
        self.request = request
        self.limit = request.app[keys.SETTINGS].upload_limit_bytes
        self.count = 0

    def _check_size(self) -> None:
        """The body received so far (the stream's count: headers, boundaries and contents) is within the limit."""
        if self.request.content.total_bytes > self.limit:
            raise body_too_large(self.request.app[keys.SETTINGS].upload_limit)

    async def parts(self) -> AsyncIterator[BodyPartReader]:
        try:
            reader = await self.request.multipart()
            while (part := await reader.next()) is not None:
                self.count += 1
                if self.count > MAX_PARTS:
                    raise InvalidRequest(f"The multipart body has more than {MAX_PARTS} parts")
                self._check_size()
                if not isinstance(part, BodyPartReader):
                    raise InvalidRequest("A multipart body nested in a part is not accepted here")
                yield part
                async for _ in self.chunks(part):  # what the caller skipped is counted too, not read blind
                    pass
        except MALFORMED as exc:
            raise InvalidRequest(f"The multipart body is malformed: {exc}") from None

    async def chunks(self, part: BodyPartReader) -> AsyncIterator[bytes]:
        try:
            while chunk := await part.read_chunk(CHUNK):
                self._check_size()
                yield chunk
        except MALFORMED as exc:
            raise InvalidRequest(f"The multipart body is malformed: {exc}") from None

    async def read(self, part: BodyPartReader) -> bytes:
        return b"".join([chunk async for chunk in self.chunks(part)])
