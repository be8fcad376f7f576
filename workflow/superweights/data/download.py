"""Resumable, verified HTTP downloads and atomic placement of downloaded files."""

import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
from tqdm import tqdm

from ..errors import UserError
from ..outputs import atomic_path

log = logging.getLogger(__name__)

CHUNK = 1 << 20
FATAL_STATUS = {401: "unauthorised", 403: "forbidden", 404: "not found", 410: "gone"}
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
HTML_STARTS = (b"<!doctype html", b"<html")


class _Retry(Exception):
    """A transient failure: try again after a pause."""


TRANSIENT = (
    _Retry,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
)


def public_url(url: str) -> str:
    """The URL without user info or query string, safe to show in messages."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def cache_path(cache_dir: Path, remote_name: str) -> Path:
    """Where a remote object (a URL or bucket key) is cached: `cache_dir` / its last path
    segment. A name that would lead elsewhere ('', '.', '..', a backslash or NUL) is a
    UserError, so a path is never built outside the cache from what a server sends."""
    name = remote_name.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    if name in ("", ".", "..") or any(c in name for c in "\\\0"):
        raise UserError(f"cannot cache {remote_name!r} under a safe file name; check the URL")
    return Path(cache_dir) / name


def link_or_copy(src: str | Path, dest: str | Path) -> Path:
    """Place `src` at `dest` atomically: a hard link where possible, else a copy."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return dest


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_html(path: Path) -> bool:
    """Whether the file starts like a web page (a login, quota or error page), not data."""
    with open(path, "rb") as handle:
        head = handle.read(256).lstrip().lower()
    return head.startswith(HTML_STARTS)


def _mismatch(path: Path, size: int | None, checksums: dict[str, str]) -> str | None:
    """Why `path` does not match the expected size and checksums, or None when it does."""
    if _looks_like_html(path):
        return "an HTML page, not data"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size {actual} bytes, expected {size}"
    for algorithm, expected in checksums.items():
        if file_digest(path, algorithm) != expected.lower():
            return f"{algorithm} checksum differs from the expected {expected}"
    return None


def _check_status(response: requests.Response, url: str) -> None:
    """Raise UserError for statuses that retrying cannot fix, _Retry for server errors."""
    status = response.status_code
    if status in FATAL_STATUS:
        raise UserError(
            f"{public_url(url)} answered HTTP {status} ({FATAL_STATUS[status]}); "
            "check the URL and your access rights"
        )
    if status >= 500 or status == 429:
        raise _Retry(f"HTTP {status}")
    if status not in (200, 206):
        raise UserError(f"{public_url(url)} answered unexpected HTTP {status}")


def _attempt(session, url, part: Path, size, timeout, progress) -> None:
    """One request: fetch what `part` still lacks; raise _Retry when it stays incomplete."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416 and offset:
            match = UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if match and int(match[1]) == offset:
                return  # the partial file is already complete
            part.unlink()
            raise _Retry("partial file does not fit the object")
        _check_status(response, url)
        if response.headers.get("Content-Type", "").lower().startswith("text/html"):
            raise UserError(
                f"{public_url(url)} answered an HTML page instead of the data (a login, quota "
                "or error page?); check the URL and your access rights"
            )
        total = None
        if response.status_code == 206:
            match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match[1]) != offset:
                part.unlink(missing_ok=True)
                raise _Retry("server answered a different range than asked")
            total = int(match[3]) if match[3] != "*" else None
            mode = "ab"
        else:  # 200: full body (the server ignored or was not sent a Range)
            offset, mode = 0, "wb"
            if "Content-Length" in response.headers:
                total = int(response.headers["Content-Length"])
        if size is not None and total is not None and total != size:
            raise UserError(
                f"{public_url(url)} has {total} bytes but {size} were expected; "
                "the remote object changed: list it again"
            )
        total = size if size is not None else total
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
        )
        with open(part, mode) as handle, bar:
            # read1 hands over whatever arrived, so bytes before a dropped connection are kept
            while block := response.raw.read1(CHUNK):
                handle.write(block)
                bar.update(len(block))
    if total is not None and part.stat().st_size < total:
        raise _Retry(f"body ended after {part.stat().st_size} of {total} bytes")


def download(
    url: str,
    dest: str | Path,
    *,
    size: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    session: requests.Session | None = None,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest`, resuming `dest.part` with HTTP Range requests.

    Transient failures (connection errors and resets, stalls longer than `timeout`, HTTP 5xx,
    truncated bodies, a file that fails its size or checksum) are retried up to `retries`
    times in a row, waiting `backoff * 2**i` seconds; an attempt that adds bytes resets the
    count, and a corrupt file is removed to start afresh. An HTML page (a login, quota or
    error page) is never taken for the data. The file appears at `dest` only once its size
    and checksums are verified. An existing `dest` is kept when it matches
    `size`/`md5`/`sha256` and is not HTML; with no size or checksum given, an existing `dest`
    is trusted (it was only ever written complete).
    """
    dest = Path(dest)
    checksums = {k: v for k, v in (("md5", md5), ("sha256", sha256)) if v}
    if dest.is_file():
        reason = _mismatch(dest, size, checksums)
        if reason is None:
            log.info("%s is already complete; skipping download", dest)
            return dest
        log.warning("%s is stale (%s); downloading again", dest, reason)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    owns_session = session is None
    session = session or requests.Session()
    failures = 0
    try:
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                if size is None or before != size:
                    _attempt(session, url, part, size, timeout, progress)
                reason = _mismatch(part, size, checksums)
                if reason is None:
                    break
                part.unlink()  # a corrupt transfer: start afresh, within the same budget
                if failures >= retries:
                    raise UserError(
                        f"download of {public_url(url)} is corrupt ({reason}) and its retries "
                        "are used up; the partial file was removed, run again to download afresh"
                    )
                raise _Retry(f"corrupt: {reason}")
            except TRANSIENT as err:
                reason = str(err) if isinstance(err, _Retry) else type(err).__name__
                after = part.stat().st_size if part.exists() else 0
                failures = 0 if after > before else failures + 1
                if failures > retries:
                    raise UserError(
                        f"download of {public_url(url)} failed after {retries} retries "
                        f"({reason}); run again to resume from {part}"
                    ) from None
                wait = backoff * 2 ** max(failures - 1, 0)
                log.warning("download of %s interrupted (%s); retrying", public_url(url), reason)
                time.sleep(wait)
    finally:
        if owns_session:
            session.close()
    os.replace(part, dest)
    return dest


def get_text(
    url: str,
    *,
    params: dict | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    session: requests.Session | None = None,
) -> str:
    """GET a small text document, retrying transient failures like `download`."""
    owns_session = session is None
    session = session or requests.Session()
    try:
        for attempt in range(retries + 1):
            try:
                response = session.get(url, params=params, timeout=timeout)
                _check_status(response, url)
                return response.text
            except TRANSIENT as err:
                reason = str(err) if isinstance(err, _Retry) else type(err).__name__
                if attempt == retries:
                    raise UserError(
                        f"request to {public_url(url)} failed after {retries} retries ({reason})"
                    ) from None
                log.warning("request to %s failed (%s); retrying", public_url(url), reason)
                time.sleep(backoff * 2**attempt)
    finally:
        if owns_session:
            session.close()
