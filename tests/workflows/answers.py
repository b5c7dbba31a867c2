"""A workflow written with FastAPI alone (no official package): answers of every kind, and errors
that come back with no Error-Origin header."""

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

app = FastAPI(title="answers")
app.state.runs = {}  # route -> times it ran

# A 1x1 PNG: its bytes are not UTF-8.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8ffff3f0005fe02fea7d69ba40000000049454e44ae426082"
)


def ran(request: Request) -> int:
    runs = request.app.state.runs
    runs[request.url.path] = runs.get(request.url.path, 0) + 1
    return runs[request.url.path]


@app.post("/conflict")
async def conflict() -> None:
    raise HTTPException(status_code=409, detail="already done")


@app.post("/busy")
async def busy(request: Request) -> JSONResponse:
    """The workflow ran, and returns a 503 of its own: no Error-Origin header."""
    return JSONResponse(status_code=503, content={"detail": f"busy, run {ran(request)}"})


@app.post("/image")
async def image() -> Response:
    return Response(content=PNG, media_type="image/png")


@app.post("/text")
async def text() -> PlainTextResponse:
    return PlainTextResponse("héllo wörld")


@app.post("/typed/{kind}")
async def typed(kind: str) -> Response:
    """Bodies in the encodings and types a workflow may declare, or fail to."""
    if kind == "json-latin-1":
        body, content_type = '{"city": "Zürich"}'.encode("latin-1"), "application/json; charset=latin-1"
    elif kind == "text-no-charset":
        body, content_type = "naïve".encode(), "text/plain"
    elif kind == "text-latin-1":
        body, content_type = "naïve".encode("latin-1"), "text/plain; charset=latin-1"
    elif kind == "problem":
        body, content_type = b'{"type": "about:blank", "title": "Gone", "status": 410}', "application/problem+json"
    elif kind == "csv":
        body, content_type = b"a,b\n1,2\n", "text/csv; charset=utf-8"
    elif kind == "none":
        body, content_type = b"\x00\x01 not json", ""
    else:
        raise HTTPException(status_code=404, detail=f"no kind {kind}")
    return Response(content=body, headers={"Content-Type": content_type} if content_type else {})


@app.post("/empty/{kind}")
async def empty(kind: str) -> Response:
    media_types = {
        "json": "application/json",
        "text": "text/plain",
        "png": "image/png",
        "problem": "application/problem+json",
    }
    return Response(
        content=b"", status_code=200, headers={"Content-Type": media_types[kind]} if kind in media_types else {}
    )


@app.post("/slashed/")
async def slashed(request: Request) -> dict:
    """Defined with a trailing slash: FastAPI answers /slashed with a 307 to /slashed/."""
    ran(request)
    return {"slashed": True, "method": request.method, "body": (await request.body()).decode()}


@app.get("/report")
async def report(day: str = "today") -> dict:
    return {"report": day}
