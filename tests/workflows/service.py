"""What the official package's service side adds to every FastAPI app of a workflow: exception
handlers that answer ``{"detail": ...}`` with ``Error-Origin: service`` (codewords-client 0.4.11,
``_setup_exception_handlers``, as it is, less the logging)."""

import traceback

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


def codewords_app(**kwargs) -> FastAPI:
    """A FastAPI app set up as ``from codewords_client import ...`` sets one up."""
    app = FastAPI(**kwargs)

    @app.exception_handler(HTTPException)
    async def http_exception_handler(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        headers.setdefault("Error-Origin", "service")
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_exception_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
        content = {"detail": jsonable_encoder(exc.errors())}
        return JSONResponse(status_code=422, content=content, headers={"Error-Origin": "service"})

    @app.exception_handler(Exception)
    async def unhandled_exception_handler(request: Request, exc: Exception) -> JSONResponse:
        frames = traceback.extract_tb(exc.__traceback__)[-5:]
        trace = "".join(traceback.format_list(frames)) + f"{type(exc).__name__}: {exc}"
        content = {"detail": "Internal server error:\n\n" + trace[:2000]}
        return JSONResponse(status_code=500, content=content, headers={"Error-Origin": "service"})

    return app
