"""A workflow built as the CodeWords templates build one: pydantic models in and out, the official
package's exception handlers, a few routes besides the main one."""

from typing import List

from fastapi import Body, HTTPException, Request
from pydantic import BaseModel, Field

from .service import codewords_app

app = codewords_app(title="greeter")


class Person(BaseModel):
    name: str = Field(min_length=1)
    age: int = Field(ge=0, le=150)


class Greeting(BaseModel):
    message: str


@app.post("/")
async def greet(person: Person) -> Greeting:
    if person.name == "nobody":
        raise HTTPException(status_code=404, detail="no such person: nobody")
    if person.name == "crash":
        raise ValueError("the greeting machine broke")
    return Greeting(message=f"Hello, {person.name} ({person.age})!")


@app.post("/sum")
async def add(numbers: List[int]) -> int:
    """A body that is a JSON list, not an object."""
    return sum(numbers)


@app.post("/shout")
async def shout(text: str = Body()) -> str:
    """A body that is a JSON string."""
    return text.upper()


@app.post("/items/{name}")
async def item(name: str, request: Request) -> dict:
    """The path segment as the workflow received it, decoded."""
    return {"name": name, "raw_path": request.scope["raw_path"].decode("latin-1")}


@app.post("/items:batch")
async def batch() -> dict:
    return {"batch": True}


@app.get("/status")
async def status(verbose: bool = False, tag: str = "") -> dict:
    """A read-only route: GET, its inputs in the query."""
    return {"ok": True, "verbose": verbose, "tag": tag}


@app.post("/headers")
async def headers(request: Request) -> dict:
    """The request headers the workflow received (names in lower case)."""
    return dict(request.headers)
