"""/v1/files: upload (multipart), list, retrieve, delete, and content."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp_apigami import docs

from localai_aio.api.multipart import Upload
from localai_aio.api.stored import call_store, list_body, list_params
from localai_aio.errors import InvalidRequest
from localai_aio.runtime import run_blocking
from localai_aio.server import keys
from localai_aio.server.openapi import answers, form_body

routes = web.RouteTableDef()

PURPOSES = ("assistants", "fine-tune", "batch", "vision", "user_data", "evals")
MAX_FILENAME = 255


async def receive_upload(request: web.Request) -> tuple[dict[str, str], Path | None, str | None]:
    """Text fields in memory, the ``file`` part streamed to a staging file on disk (never held whole)."""
    executor = request.app[keys.EXECUTOR]
    store = request.app[keys.STORE]
    upload = Upload(request)
    fields: dict[str, str] = {}
    staged: Path | None = None
    filename: str | None = None
    try:
        async for part in upload.parts():
            if part.name == "file" and staged is None:
                staged = await run_blocking(executor, store.staging_path)  # makes its folder
                filename = part.filename or "upload"
                out = await run_blocking(executor, staged.open, "wb")  # opened once, written chunk by chunk
                try:
                    async for chunk in upload.chunks(part):
                        await run_blocking(executor, out.write, chunk)
                finally:
                    await run_blocking(executor, out.close)
            elif part.name:
                fields[part.name] = (await upload.read(part)).decode("utf-8", "replace")
    except BaseException:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise
    return fields, staged, filename


@routes.post("/v1/files")
@docs(tags=["files"], summary="Upload a file (multipart: `file`, `purpose`).",
      requestBody=form_body({"file": {"type": "string", "format": "binary"},
                             "purpose": {"type": "string", "enum": list(PURPOSES)}}, required=["file", "purpose"]),
      responses=answers("File"))
async def upload_file(request: web.Request) -> web.Response:
    fields, staged, filename = await receive_upload(request)
    try:
        if staged is None:
            raise InvalidRequest("'file' is required", param="file")
        purpose = fields.get("purpose")
        if purpose not in PURPOSES:
            raise InvalidRequest(f"'purpose' is required and must be one of {', '.join(PURPOSES)}", param="purpose")
        name = Path(filename or "upload").name[:MAX_FILENAME] or "upload"  # kept as a label, never a path
        return web.json_response(await call_store(request, "create_file", staged, filename=name, purpose=purpose))
    finally:
        if staged is not None and staged.exists():
            staged.unlink(missing_ok=True)


@routes.get("/v1/files")
@docs(tags=["files"], summary="List files (`purpose`, `limit` up to 10,000, `order`, `after`, `before`).",
      responses=answers("FileList"))
async def list_files(request: web.Request) -> web.Response:
    page = await call_store(request, "list_files", purpose=request.query.get("purpose"),
                            **list_params(request, default_limit=10_000, max_limit=10_000))
    return web.json_response(list_body(page))


@routes.get("/v1/files/{file_id}")
@docs(tags=["files"], summary="Retrieve a file's metadata.", responses=answers("File"))
async def get_file(request: web.Request) -> web.Response:
    return web.json_response(await call_store(request, "get_file", request.match_info["file_id"]))


@routes.delete("/v1/files/{file_id}")
@docs(tags=["files"], summary="Delete a file (and its links to assistants).", responses=answers("Deleted"))
async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    await call_store(request, "delete_file", file_id)
    return web.json_response({"id": file_id, "object": "file", "deleted": True})


@routes.get("/v1/files/{file_id}/content")
@docs(tags=["files"], summary="Download a file's bytes.",
      responses=answers(content_type="application/octet-stream"))
async def file_content(request: web.Request) -> web.FileResponse:
    path = await call_store(request, "file_path", request.match_info["file_id"])
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
