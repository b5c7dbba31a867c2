"""A workflow that takes a file by URL (the URL ``upload()`` returns) and reads it."""

import hashlib

import requests
from pydantic import BaseModel

from .service import codewords_app

app = codewords_app(title="files")


class FileInput(BaseModel):
    file: str


@app.post("/")
def count_lines(inputs: FileInput) -> dict:
    answer = requests.get(inputs.file, timeout=30)
    answer.raise_for_status()
    content = answer.content
    return {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "lines": content.count(b"\n")}
