"""Reading and validating a survey submission: every bad input is a 4xx, never a 500.

The body is read by hand, not by FastAPI's model binding, so its size is
capped while it streams in (a huge upload is cut off at the cap with 413, not
buffered whole) and every way JSON decoding can fail maps to a client error:
malformed JSON, bad UTF-8, nesting deep enough to exhaust the parser's
recursion, numbers too long to convert. Strings that SQLite could not store
(lone surrogates) are refused at validation.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final

from fastapi import HTTPException, Request
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictStr,
    StringConstraints,
    ValidationError,
)

MAX_ANSWERS: Final = 50
MAX_ANSWER_CHARS: Final = 1000
#: Numeric answers are scores and counts; bounded so they fit SQLite's 64-bit integers.
MAX_INT: Final = 1_000_000


def _encodable(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def _answer(value: object) -> int | str:
    """A whole number in [-MAX_INT, MAX_INT] or a string of at most MAX_ANSWER_CHARS."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not -MAX_INT <= value <= MAX_INT:
            raise ValueError(f"a number answer must be within [-{MAX_INT}, {MAX_INT}]")
        return value
    if isinstance(value, str):
        if len(value) > MAX_ANSWER_CHARS:
            raise ValueError(f"a text answer must be at most {MAX_ANSWER_CHARS} characters")
        return _encodable(value)
    raise ValueError("an answer must be a whole number or a string")


QuestionId = Annotated[StrictStr, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
Answer = Annotated[int | str, PlainValidator(_answer)]


class Submission(BaseModel):
    """``{"respondent": "...", "answers": {"q1": 4, "q2": "text"}}``; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    respondent: Annotated[
        StrictStr, StringConstraints(min_length=1, max_length=64), AfterValidator(_encodable)
    ]
    answers: Annotated[dict[QuestionId, Answer], Field(max_length=MAX_ANSWERS)]


async def read_submission(request: Request, max_body_bytes: int) -> Submission:
    """The validated submission in `request`'s body, or an `HTTPException` (400/413/415/422)."""
    content_type = request.headers.get("content-type", "application/json")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise HTTPException(415, "The body must be JSON (Content-Type: application/json).")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
        raise HTTPException(413, f"The body must be at most {max_body_bytes} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise HTTPException(413, f"The body must be at most {max_body_bytes} bytes.")
    data = _decode(bytes(body))
    try:
        return Submission.model_validate(data)
    except ValidationError as exc:
        raise HTTPException(422, _errors(exc)) from None


def _decode(body: bytes) -> Any:
    if not body.strip():
        raise HTTPException(400, "The body is empty; expected a JSON object.")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, bad UTF-8 and over-long integers.
        raise HTTPException(400, "The body is not valid JSON.") from None


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors without the offending input echoed back (it may be large)."""
    return [
        {
            "loc": [_printable(part) for part in error["loc"]],
            "msg": error["msg"],
            "type": error["type"],
        }
        for error in exc.errors(include_url=False, include_input=False)[:20]
    ]


def _printable(part: int | str) -> int | str:
    """A location part (it may be a client's dict key) that is safe to encode and short."""
    if isinstance(part, int):
        return part
    return part.encode("utf-8", "backslashreplace").decode("utf-8")[:64]
