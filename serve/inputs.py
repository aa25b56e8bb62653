"""What the API accepts: strict request models and the content types of request bodies.

The request models are ``pathloop.schemas``' with pydantic's strict mode on: JSON types as
written (``true`` is not 1, ``"yes"`` is not True, ``"3"`` is not 3) and finite numbers only (NaN
and infinity are refused). JSON routes take ``application/json`` bodies only (415 otherwise): a
cross-site page can post ``text/plain``, form or multipart bodies without a CORS preflight, never
JSON. The upload route takes PNG/JPEG bodies, or multipart with an image ``file`` part.
"""

from __future__ import annotations

import email.parser
import email.policy

from fastapi import HTTPException, Request
from pydantic import ConfigDict, Field

from pathloop import schemas as S
from serve.errors import InputError

STRICT = ConfigDict(strict=True, allow_inf_nan=False)
IMAGE_TYPES = ("image/png", "image/jpeg")
MULTIPART = "multipart/form-data"


# ----------------------------------------------------------------------------- request models


class GenerateRequest(S.GenerateRequest):
    """Draw ``n`` images of one class; image i uses seed ``seed + i``."""

    model_config = STRICT


class ScoreRequest(S.ScoreRequest):
    """One image to score for its declared class (PNG or JPEG bytes, base64)."""

    model_config = STRICT
    resize: bool = Field(
        False,
        description="Centre-crop and resize an image of another size to the scorer's; "
        "false: such an image is refused (422).",
    )


class LabelRequest(S.LabelRequest):
    """The signed-in rater's label for one image of the review round (an upsert)."""

    model_config = STRICT


class UndoRequest(S.UndoRequest):
    """Step the signed-in rater's label of one image back one revision."""

    model_config = STRICT


# ----------------------------------------------------------------------------- content types


def media_type(content_type: str) -> str:
    """``image/png`` of ``image/PNG; charset=x``: the type without parameters, lower case."""
    return content_type.split(";", 1)[0].strip().lower()


def json_only(request: Request) -> None:
    """Dependency of the JSON routes: 415 unless the body is declared ``application/json``."""
    ctype = request.headers.get("content-type", "")
    kind = media_type(ctype)
    if kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return
    got = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
    raise HTTPException(415, f"{got}: send the JSON body with Content-Type: application/json")


def upload_image(content_type: str, body: bytes) -> tuple[bytes, str | None]:
    """(image bytes, form ``class_name`` or None) of an upload: a PNG/JPEG body, or multipart
    with a ``file`` part of an image type. Anything else is 415, naming what is accepted."""
    kind = media_type(content_type)
    if kind in IMAGE_TYPES:
        return body, None
    if kind != MULTIPART:
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise HTTPException(
            415, f"{got}: send image/png or image/jpeg bytes, or {MULTIPART} with a 'file' part"
        )
    form = parse_multipart(content_type, body)
    if "file" not in form:
        raise InputError(f"the {MULTIPART} body has no 'file' part: add the image as 'file'")
    part_type, image = form["file"]
    if media_type(part_type) not in IMAGE_TYPES:
        raise HTTPException(
            415, f"the 'file' part is {part_type!r}: send it as image/png or image/jpeg"
        )
    name = form.get("class_name")
    return image, None if name is None else name[1].decode("utf-8", "replace").strip()


def upload_images(content_type: str, body: bytes) -> tuple[list[bytes], list[str]]:
    """(image bytes of every ``file`` part, every ``class_name`` field) of a multipart batch
    upload, in body order; a ``file`` part of another type is 415."""
    if media_type(content_type) != MULTIPART:
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise HTTPException(415, f"{got}: send {MULTIPART} with one 'file' part per image")
    images, names = [], []
    for field, part_type, data in multipart_parts(content_type, body):
        if field == "file":
            if media_type(part_type) not in IMAGE_TYPES:
                raise HTTPException(
                    415, f"'file' part {len(images)} is {part_type!r}: send image/png or image/jpeg"
                )
            images.append(data)
        elif field == "class_name":
            names.append(data.decode("utf-8", "replace").strip())
    return images, names


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    """{field name: (content type, bytes)} of a multipart/form-data body, the last part of a
    repeated name winning. A part without a Content-Type is text/plain, as in MIME."""
    return {name: (ctype, data) for name, ctype, data in multipart_parts(content_type, body)}


def multipart_parts(content_type: str, body: bytes) -> list[tuple[str, str, bytes]]:
    """(field name, content type, bytes) of every named part of a multipart/form-data body, in
    order (stdlib email parser)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    try:
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        if not msg.is_multipart():
            raise ValueError("not a multipart body")
        out = []
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name:
                data = part.get_payload(decode=True) or b""
                out.append((str(name), part.get_content_type(), data))
        return out
    except Exception as err:  # the parser raises many kinds on malformed input
        raise InputError(f"malformed {MULTIPART} body: {err}") from None
