"""JSON request bodies: DRF's parser, refusing a key given twice in one object.

Python's json module keeps the last of a repeated key, so `{"gpu_count": 1, "gpu_count": 8}`
would book eight GPUs while a client (or a proxy, or a log) reading the first saw one. As an
unknown field and a repeated query parameter are, it is refused: 400 `duplicate_field`, named
with its path (`workload.image`).
"""

from rest_framework import parsers
from rest_framework.exceptions import ParseError
from rest_framework.utils import json

from config.errors import ValidationFailed

__all__ = ["JSONParser"]


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


class _Object(dict):
    """An object as parsed the second time, to name where the repeated key is."""

    duplicate: str | None = None


def _marking_duplicates(pairs: list[tuple[str, object]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _duplicate_path(text: str) -> str:
    parsed = json.loads(text, object_pairs_hook=_marking_duplicates)
    stack: list[tuple[object, str]] = [(parsed, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _Object):
            if item.duplicate is not None:
                return f"{path}.{item.duplicate}" if path else item.duplicate
            children = [(v, f"{path}.{k}" if path else k) for k, v in item.items()]
        elif isinstance(item, list):
            children = [(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(item)]
        else:
            continue
        stack.extend(reversed(children))  # outermost first, then in the document's order
    raise AssertionError("no repeated key found")  # unreachable: the first parse found one


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        encoding = parsers.get_encoding(parser_context or {})
        try:
            text = stream.read().decode(encoding)
            parse_constant = json.strict_constant if self.strict else None
            return json.loads(
                text, parse_constant=parse_constant, object_pairs_hook=_refuse_duplicates
            )
        except _DuplicateKey:
            field = _duplicate_path(text)[:100]
            raise ValidationFailed(
                f"The field {field!r} is given more than once; give each field once.",
                code="duplicate_field",
                field=field,
            ) from None
        except ValueError as exc:  # not JSON, or not in the body's encoding
            raise ParseError(f"JSON parse error - {exc}") from None
