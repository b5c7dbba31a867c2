"""A workflow that takes longer than the gateway waits, and counts how often it ran."""

import asyncio

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI(title="slow")
app.state.runs = 0


class Job(BaseModel):
    seconds: float
    tag: str = ""


@app.post("/")
async def work(job: Job) -> dict:
    app.state.runs += 1
    await asyncio.sleep(job.seconds)
    return {"slept": job.seconds, "tag": job.tag}
