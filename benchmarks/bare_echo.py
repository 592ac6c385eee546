"""The baseline for runq's overhead: the smallest FastAPI app that answers what runq's echo does.

Served the way runq serves its gateway (uvicorn, one process, loop and http left on "auto", no
access log, the same backlog), so the difference measured is runq's queue and worker, not the
server settings.

    python benchmarks/bare_echo.py --port 8001
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class EchoIn(BaseModel):
    input: Any


app = FastAPI()


@app.post("/echo")
async def echo(body: EchoIn) -> dict[str, Any]:
    return {"output": body.input}


def serve(asgi_app: FastAPI, port: int) -> None:
    """uvicorn as the module docstring says; benchmarks/queue_floor.py serves its app so too."""
    uvicorn.run(
        asgi_app,
        host="127.0.0.1",
        port=port,
        workers=1,
        backlog=2048,
        access_log=False,
        log_level="warning",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(app, args.port)


if __name__ == "__main__":
    main()
