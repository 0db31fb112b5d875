"""What is never logged: secrets found by name, inside URLs, and by value wherever they turn up.

Three rules, applied to every param, tag, text artifact and the stage's log file (:mod:`pipeline.tracking.runs`):

- **by name**: the value of a key or environment variable named like a token, key, secret or password
  (``HF_TOKEN``, ``WANDB_API_KEY``, ``hub.api_token``) becomes ``[redacted]``;
- **inside URLs**: the password of a URL's userinfo becomes ``[redacted]`` (``https://user:[redacted]@mirror``), in any
  value (``HF_ENDPOINT``, ``MLFLOW_TRACKING_URI``, a config value, a log line); a userinfo without a password that is
  as long as a token (``https://<token>@host``) goes whole;
- **by value**: the values those rules found — of secret-named environment variables, of secret-named config keys
  (:func:`remember`), the passwords inside URL-valued environment variables — are replaced wherever they appear in
  logged text (an error message, a log line, an artifact). Values shorter than :data:`MIN_SECRET` characters or all
  digits are left to the first two rules (scrubbing ``"1"`` everywhere would mangle the logs), and so are environment
  values that are paths on this machine (``PWD``, named like ``pwd``, is the working directory).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

REDACTED = "[redacted]"
MIN_SECRET = 6           # shortest value scrubbed wherever it appears
TOKEN_USER = 16          # a userinfo without a password this long is taken for a token
_SECRET = re.compile(r"(secret|password|passwd|credential)|(^|[_.\-])(token|key|api_?key|pwd|auth)$", re.IGNORECASE)
# scheme://userinfo@ — the userinfo holds no "/", "@", "?", "#" or white space; the user part no ":"
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s/@:?#]*)(?::(?P<pw>[^\s/@?#]*))?@")
NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})  # named like a password (pwd), but the shell's working directories
_remembered: set[str] = set()


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name.rsplit(".", 1)[-1]))


def redact_urls(text: str) -> str:
    """Every URL in ``text`` with the password of its userinfo redacted (a token-long user alone: the userinfo)."""
    if "://" not in text:
        return text

    def repl(m: re.Match[str]) -> str:
        if m.group("pw") is not None:
            return f"{m.group('scheme')}{m.group('user')}:{REDACTED}@"
        if len(m.group("user")) >= TOKEN_USER:
            return f"{m.group('scheme')}{REDACTED}@"
        return m.group(0)

    return _URL_USERINFO.sub(repl, text)


def url_passwords(text: str) -> list[str]:
    """The passwords (and token-long users without one) inside the URLs of ``text``, as written and decoded."""
    found = []
    for m in _URL_USERINFO.finditer(text):
        user, secret = m.group("user"), m.group("pw")
        if secret is None:
            secret = user if len(user) >= TOKEN_USER else ""
        if secret:
            found += [secret, unquote(secret)]
    return found


def _worth_scrubbing(value: str) -> bool:
    return len(value) >= MIN_SECRET and not value.isdigit()


def secret_values(tree: Any) -> set[str]:
    """The values of secret-named keys in a nested dict/list, and the passwords in its URL-valued strings."""
    found: set[str] = set()
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if is_secret(str(k)) and isinstance(v, (str, int, float)) and not isinstance(v, bool):
                found.add(str(v))
            found |= secret_values(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            found |= secret_values(v)
    elif isinstance(tree, str):
        found.update(url_passwords(tree))
        if "=" in tree and is_secret(tree.split("=", 1)[0]):  # "key=value" overrides
            found.add(tree.split("=", 1)[1])
    return {v for v in found if _worth_scrubbing(v)}


def remember(tree: Any) -> None:
    """Keep the secret values of a config tree for this process: later scrubbing replaces them wherever they appear."""
    _remembered.update(secret_values(tree))


class Scrubber:
    """Replaces URL passwords and every known secret value in a text; the known values are read when it is made
    (the environment's secret-named variables and URL passwords, and what :func:`remember` kept)."""

    def __init__(self, env: Mapping[str, str] | None = None, extra: Iterable[str] = ()):
        env = os.environ if env is None else env
        named = {v for k, v in env.items() if is_secret(k) and k not in NOT_SECRET_ENV and not os.path.exists(v)}
        values = named | set(_remembered) | set(extra)
        for v in env.values():
            values.update(url_passwords(v))
        self.values = sorted((v for v in values if _worth_scrubbing(v)), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = redact_urls(text)
        for value in self.values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def bytes_hold_secret(self, data: bytes) -> bool:
        """Whether raw bytes hold a known secret value or a URL with a password (a file worth scrubbing)."""
        return any(v.encode("utf-8") in data for v in self.values) or (
            b"://" in data and bool(_URL_USERINFO.search(data.decode("utf-8", "replace"))))


def scrub(text: str) -> str:
    """``text`` with URL passwords and every known secret value replaced (see :class:`Scrubber`)."""
    return Scrubber()(text)


def redact(tree: Any, scrubber: Scrubber | None = None, *, by_name: bool = True) -> Any:
    """A copy of a nested dict/list with every string scrubbed and, ``by_name`` (configs, not data such as a report
    whose ``sort_key`` is no secret), the values of secret-looking keys and ``key=value`` overrides replaced."""
    scrubber = scrubber or Scrubber()
    if isinstance(tree, Mapping):
        return {k: REDACTED if by_name and is_secret(str(k)) and v not in (None, "") else
                redact(v, scrubber, by_name=by_name) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(v, scrubber, by_name=by_name) for v in tree]
    if isinstance(tree, str):
        if by_name and "=" in tree and is_secret(tree.split("=", 1)[0]):  # "key=value" overrides
            return tree.split("=", 1)[0] + "=" + REDACTED
        return scrubber(tree)
    return tree


class ScrubbingFormatter(logging.Formatter):
    """A log formatter whose every line (message, arguments and traceback) is scrubbed of secrets."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None, scrubber: Scrubber | None = None):
        super().__init__(fmt, datefmt)
        self.scrubber = scrubber or Scrubber()

    def format(self, record: logging.LogRecord) -> str:
        return self.scrubber(super().format(record))
