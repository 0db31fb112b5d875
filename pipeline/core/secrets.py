"""What is never logged: the values of keys and environment variables named like a token, key, secret or password."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[redacted]"
_SECRET = re.compile(r"(secret|password|passwd|credential)|(^|[_.\-])(token|key|api_?key|pwd|auth)$", re.IGNORECASE)


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name.rsplit(".", 1)[-1]))


def redact(tree: Any) -> Any:
    """A copy of a nested dict/list with the values of secret-looking keys replaced."""
    if isinstance(tree, Mapping):
        return {k: REDACTED if is_secret(str(k)) and v not in (None, "") else redact(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    if isinstance(tree, str) and "=" in tree and is_secret(tree.split("=", 1)[0]):  # "key=value" overrides
        return tree.split("=", 1)[0] + "=" + REDACTED
    return tree
