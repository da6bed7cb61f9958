"""Bytecodes the interpreter executes for one request, per function, traced.

Calls a variant's app directly (no server: the default asyncio loop, a
hand-made scope with one ``Host`` header, as `bench/instructions.py` sends),
warms it up, then traces one request with ``f_trace_opcodes`` and prints the
opcodes executed per function, most first. A count of steps, not of time:
`bench/instructions.py` gives what they cost inside uvicorn.

    python bench/opcodes.py --variants bare,memory
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import sys
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.types import ASGIApp, Message

from bench.apps import make_app  # noqa: F401  (registers the variants)
from bench.variants import get_variant


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5555),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [(b"host", b"bench")],
        "state": {},
    }


async def _count(app: ASGIApp, warmup: int) -> collections.Counter[str]:
    startup: asyncio.Queue[Message] = asyncio.Queue()

    async def lifespan_receive() -> Message:
        return await startup.get()

    started = asyncio.Event()

    async def lifespan_send(message: Message) -> None:
        if message["type"].startswith("lifespan.startup."):  # complete (or failed)
            started.set()

    lifespan = asyncio.ensure_future(
        app(
            {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
            lifespan_receive,
            lifespan_send,
        )
    )
    await startup.put({"type": "lifespan.startup"})
    # Started before any request, as a server does (a start-up still running could be
    # traced beside the request).
    await asyncio.wait_for(started.wait(), 30)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    counts: collections.Counter[str] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        if event == "opcode":
            code = frame.f_code
            where = code.co_filename.split("site-packages/")[-1]
            counts[f"{where.split(os.sep + 'throttle_mw' + os.sep)[-1]}:{code.co_name}"] += 1
        return tracer

    for _ in range(warmup):
        await app(_scope(), receive, send)
    scope = _scope()
    # No collection inside the traced request: one there runs the finalizers of whatever
    # the process dropped before (in a test worker, other tests' sockets and their
    # ResourceWarnings), traced as if the request ran them. (A CI run counted bare at
    # 1,830 opcodes against its 790.)
    gc.collect()
    gc.disable()
    sys.settrace(tracer)
    try:
        await app(scope, receive, send)
    finally:
        sys.settrace(None)
        gc.enable()
    await startup.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(lifespan, 5)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/opcodes.py", description=__doc__)
    parser.add_argument("--variants", default="bare,memory")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for name in args.variants.split(","):
        variant = get_variant(name)
        saved = dict(os.environ)
        # The middleware reads THROTTLE_* from the environment when it is built.
        os.environ.update(variant.env)
        try:
            counts = asyncio.run(_count(variant.build(dict(os.environ)), args.warmup))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        print(f"{name}: {sum(counts.values()):,} opcodes")
        for where, n in counts.most_common(args.top):
            print(f"  {n:6,d} {where}")


if __name__ == "__main__":
    main()
