"""Dataset URIs: parse ``s3://`` / ``file://`` globs into a :class:`DatasetLocation` and match keys."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SUPPORTED_SCHEMES = ("s3", "file")
#: The characters that make a path a glob (``*``, ``?``, ``[``).
GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class DatasetLocation:
    """A parsed dataset URI.

    :param scheme: ``s3`` or ``file``
    :param bucket: the S3 bucket; empty for local files
    :param pattern: the key (S3) or absolute path (local) glob
    :param root: the fixed directory part before the first glob character; listings start here and
        the success marker lives here
    """

    scheme: str
    bucket: str
    pattern: str
    root: str

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        # Cached per location: re's own cache holds 512 patterns, and a triggerer polls 1,000 datasets.
        return _pattern_regex(self.pattern)

    def object_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}" if self.scheme == "s3" else f"file://{key}"

    @property
    def marker_base(self) -> str:
        return self.root if self.root.endswith("/") else self.root + "/"


def parse_dataset_uri(uri: str, *, param: str = "uri") -> DatasetLocation:
    """Parse ``s3://bucket/key-glob``, ``file:///abs/path-glob`` or ``/abs/path-glob``.

    A URI ending in ``/`` means every object below it; one without glob characters and without a
    trailing ``/`` means that object, or every object below it if it is a directory/prefix.

    :param uri: the rendered URI
    :param param: the parameter name to put in error messages
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"{param}={uri!r} is invalid: expected a non-empty s3:// or file:// URI.")
    if uri.startswith("/"):
        uri = "file://" + uri
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"{param}={uri!r} has unsupported scheme {parts.scheme!r}: supported are "
            f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)} (or an absolute local path). Other "
            "object stores are not supported by DatasetSensor yet."
        )
    if scheme == "s3":
        bucket = parts.netloc
        key = unquote(parts.path.lstrip("/"))
        if not bucket or GLOB_CHARS.search(bucket):
            raise ValueError(f"{param}={uri!r} is invalid: expected s3://<bucket>/<key or glob>.")
        pattern = key
    else:
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{param}={uri!r} is invalid: a file:// URI needs an absolute path (file:///data/...)."
            )
        pattern = unquote(parts.path)
        if not pattern.startswith("/"):
            raise ValueError(f"{param}={uri!r} is invalid: local paths must be absolute.")
        bucket = ""
    glob_at = GLOB_CHARS.search(pattern)
    if glob_at:
        root = pattern[: pattern.rfind("/", 0, glob_at.start()) + 1]
    elif pattern.endswith("/") or not pattern:
        root = pattern
    else:
        root = pattern + "/"
    return DatasetLocation(scheme=scheme, bucket=bucket, pattern=pattern, root=root)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Glob -> regex: ``*``/``?`` stay within one path segment, ``**`` crosses segments."""
    if not pattern or pattern.endswith("/"):
        pattern += "**"
    elif not GLOB_CHARS.search(pattern):
        return re.compile(re.escape(pattern) + r"(?:/.+)?")
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append(r"(?:.+/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif c == "*":
            out.append(r"[^/]*")
            i += 1
        elif c == "?":
            out.append(r"[^/]")
            i += 1
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out))


def listing_prefix(location: DatasetLocation) -> str:
    """The S3 prefix to list for ``location``: its fixed part before any glob character."""
    return location.root if GLOB_CHARS.search(location.pattern) else location.pattern
