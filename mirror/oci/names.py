"""Repository names, tags and references, validated before anything touches the filesystem."""

from __future__ import annotations

import re

from mirror.errors import NameInvalid, TagInvalid

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# Clients cap host + name at 255 characters; the name alone can never be longer.
MAX_NAME_LENGTH = 255


def is_valid_name(name: str) -> bool:
    if not name or len(name) > MAX_NAME_LENGTH:
        return False
    return all(_COMPONENT.fullmatch(part) for part in name.split("/"))


def validate_name(name: str) -> str:
    """Return `name` when it is a valid repository name, else raise NAME_INVALID."""
    if not is_valid_name(name):
        raise NameInvalid(f"invalid repository name: {name[:300]!r}", detail={"name": name[:300]})
    return name


def is_valid_tag(tag: str) -> bool:
    return bool(_TAG.fullmatch(tag))


def validate_tag(tag: str) -> str:
    if not is_valid_tag(tag):
        raise TagInvalid(f"invalid tag: {tag[:200]!r}", detail={"tag": tag[:200]})
    return tag
