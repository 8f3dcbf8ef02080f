"""What a remote URL may be, and how a URL or a spec is shown: the one home of both rules.

    url_problem(url)   why an http(s):// or s3:// URL cannot be read (None when it can): the rule every
                       shard URL, index URL and redirect target passes before anything is fetched;
    shown_url(url)     the URL as messages, logs and records show it;
    shown_spec(text)   a spec (or a pipe: command) with every URL in it shown that way.

Credentials never travel in a URL. Userinfo (``scheme://user:secret@host``) is refused: it would be
copied into log lines, exception texts, run_config.json, summaries and process listings. A query string
(a presigned URL's token) is allowed and used, but never shown or recorded.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Optional

SCHEMES = ("http", "https", "s3")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URL = re.compile(_SCHEME.pattern + r"\S*")  # a URL inside a spec, a pipe: command or a message
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
USERINFO_FIX = ("give credentials another way: ~/.netrc (or $NETRC) for http(s) servers, the AWS_* variables or "
                "~/.aws for s3://, or a presigned URL (its query string is used but never printed or recorded)")


def is_remote(url: str) -> bool:
    """An http://, https:// or s3:// URL (``http:name`` without the slashes is not one)."""
    return url.lower().startswith(tuple(f"{scheme}://" for scheme in SCHEMES))


def shown_url(url: str) -> str:
    """``url`` as messages and records show it: without query string and fragment (where presigned
    tokens live), and with everything between ``://`` and the last ``@`` before them (userinfo, even a
    malformed one with a ``/`` in the password) replaced by ``***``. Never raises; a text that is not a
    ``scheme://`` URL is returned as it is."""
    if _SCHEME.match(url) is None:
        return url
    head = re.split(r"[?#]", url, maxsplit=1)[0]
    scheme, _, rest = head.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}://{rest}"


def shown_spec(text: str) -> str:
    """``text`` (a spec of sources joined by "::", a pipe: command, a shell-quoted command line) with every
    URL in it shown by ``shown_url``."""
    return "::".join(_URL.sub(_shown_match, part) for part in text.split("::"))


def _shown_match(match: re.Match) -> str:
    url = match.group(0)
    shown = shown_url(url)
    quote = url[-1] if url[-1] in "'\"" and not shown.endswith(url[-1]) else ""  # 'URL?query' keeps its quote
    return shown + quote


def url_problem(url: str) -> Optional[str]:
    """Why the http(s):// or s3:// ``url`` cannot be read, as the end of a sentence that starts with the
    URL (None when it can be read). Refused: another scheme, control characters (and, over http(s),
    whitespace: write %20), a host or port that does not parse, no host or bucket, and userinfo."""
    if _CONTROL.search(url) or (not url.lower().startswith("s3:") and re.search(r"\s", url)):
        return "contains whitespace or control characters (write a space in a path as %20)"
    try:
        parts = urllib.parse.urlsplit(url)
        if "@" in parts.netloc:
            return f"carries a user name or password (userinfo), which moe_dist refuses; {USERINFO_FIX}"
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError:
        return "has a host or port that does not parse (a port is a number in 1..65535)"
    if parts.scheme.lower() not in SCHEMES:
        return f"uses the {parts.scheme or 'empty'}: scheme; remote data is read over http://, https:// and s3:// only"
    if not parts.hostname:
        return "names no " + ("bucket (write s3://BUCKET/KEY)" if parts.scheme.lower() == "s3" else "host")
    if port == 0:
        return "has port 0"
    return None
