"""Resumable downloads against a local HTTP server with injected faults."""

import hashlib
import logging
import time

import numpy as np
import pytest
import requests

from http_server import ObjectServer
from superweights.data.download import download, get_text, link_or_copy, public_url
from superweights.errors import UserError

KEY = "bucket/object.bin"


@pytest.fixture
def payload():
    return np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


@pytest.fixture
def server(payload):
    with ObjectServer() as srv:
        srv.add(KEY, payload)
        yield srv


def fetch(server, dest, **kwargs):
    kwargs = {"retries": 3, "backoff": 0.0, "timeout": 5.0, "progress": False} | kwargs
    return download(f"{server.url}/{KEY}", dest, **kwargs)


def test_dropped_connection_resumes_with_range(server, payload, tmp_path):
    server.fault(KEY, drop_after=100_000)
    dest = fetch(server, tmp_path / "obj.bin", md5=hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload
    sent = server.requests_for(KEY)
    assert len(sent) == 2
    assert "Range" not in sent[0]["headers"]
    assert sent[1]["headers"]["Range"] == "bytes=100000-"
    assert not (tmp_path / "obj.bin.part").exists()


def test_restart_continues_an_existing_part(server, payload, tmp_path):
    (tmp_path / "obj.bin.part").write_bytes(payload[:1234])
    fetch(server, tmp_path / "obj.bin", size=len(payload))
    assert (tmp_path / "obj.bin").read_bytes() == payload
    assert [r["headers"]["Range"] for r in server.requests_for(KEY)] == ["bytes=1234-"]


def test_server_ignoring_range_restarts_from_zero(payload, tmp_path):
    with ObjectServer(ignore_range=True) as srv:
        srv.add(KEY, payload)
        srv.fault(KEY, drop_after=50_000)
        (tmp_path / "obj.bin.part").write_bytes(b"junk that must be discarded")
        dest = fetch(srv, tmp_path / "obj.bin", sha256=hashlib.sha256(payload).hexdigest())
        assert dest.read_bytes() == payload
        assert len(srv.requests_for(KEY)) == 2


def test_complete_part_is_not_fetched_again(server, payload, tmp_path):
    (tmp_path / "obj.bin.part").write_bytes(payload)
    fetch(server, tmp_path / "obj.bin")  # size unknown: the server answers 416 */total
    assert (tmp_path / "obj.bin").read_bytes() == payload


@pytest.mark.parametrize("checksum", ["md5", "sha256"])
def test_checksum_mismatch_leaves_nothing(server, payload, tmp_path, checksum):
    wrong = hashlib.new(checksum, payload + b"x").hexdigest()
    with pytest.raises(UserError, match="corrupt"):
        fetch(server, tmp_path / "obj.bin", **{checksum: wrong})
    assert list(tmp_path.iterdir()) == []


def test_truncated_bodies_are_retried(server, payload, tmp_path):
    for cut in (10, 20_000):
        server.fault(KEY, drop_after=cut)
    fetch(server, tmp_path / "obj.bin", size=len(payload), retries=1)
    assert (tmp_path / "obj.bin").read_bytes() == payload
    ranges = [r["headers"].get("Range") for r in server.requests_for(KEY)]
    assert ranges == [None, "bytes=10-", "bytes=20010-"]


def test_persistent_failure_gives_up(server, tmp_path):
    for _ in range(3):
        server.fault(KEY, status=503)
    with pytest.raises(UserError, match="after 2 retries"):
        fetch(server, tmp_path / "obj.bin", retries=2)
    assert not (tmp_path / "obj.bin").exists()
    assert len(server.requests_for(KEY)) == 3


def test_server_errors_then_success(server, payload, tmp_path):
    server.fault(KEY, status=500)
    server.fault(KEY, status=503)
    assert fetch(server, tmp_path / "obj.bin").read_bytes() == payload


def test_missing_object_fails_fast_without_retries(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError, match=r"bucket/absent\.bin answered HTTP 404"):
        download(f"{server.url}/bucket/absent.bin", tmp_path / "x", retries=5, backoff=30.0)
    assert time.monotonic() - start < 5
    assert len(server.requests_for("bucket/absent.bin")) == 1
    assert list(tmp_path.iterdir()) == []


def test_wrong_expected_size_is_reported(server, payload, tmp_path):
    with pytest.raises(UserError, match=f"has {len(payload)} bytes but 5 were expected"):
        fetch(server, tmp_path / "obj.bin", size=5)


def test_existing_verified_file_is_skipped(server, payload, tmp_path):
    dest = tmp_path / "obj.bin"
    dest.write_bytes(payload)
    fetch(server, dest, size=len(payload), md5=hashlib.md5(payload).hexdigest())
    assert server.requests_for(KEY) == []


def test_stale_file_is_replaced(server, payload, tmp_path):
    dest = tmp_path / "obj.bin"
    dest.write_bytes(b"old")
    fetch(server, dest, size=len(payload))
    assert dest.read_bytes() == payload


def test_credentials_never_logged(server, tmp_path, caplog):
    secret = "s3cr3t-token-value"
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {secret}"
    server.fault(KEY, status=503)
    with caplog.at_level(logging.DEBUG, logger="superweights"):
        fetch(server, tmp_path / "obj.bin", session=session)
        with pytest.raises(UserError) as err:
            download(f"{server.url}/nope?sig={secret}", tmp_path / "y", session=session)
    assert server.requests_for(KEY)[0]["headers"]["Authorization"] == f"Bearer {secret}"
    assert secret not in caplog.text
    assert secret not in str(err.value)


def test_public_url_drops_userinfo_and_query():
    url = "https://user:pw@host.example:8443/a/b.h5ad?X-Amz-Signature=abc"
    assert public_url(url) == "https://host.example:8443/a/b.h5ad"


def test_get_text_retries_then_returns(server):
    server.add("doc.txt", b"hello")
    server.fault("doc.txt", status=502)
    assert get_text(f"{server.url}/doc.txt", backoff=0.0) == "hello"


def test_link_or_copy_places_identical_file(tmp_path):
    src = tmp_path / "a.h5ad"
    src.write_bytes(b"abc")
    dest = link_or_copy(src, tmp_path / "sub_b.h5ad")
    assert dest.read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad", "sub_b.h5ad"]


# --- a misbehaving server: each fault ends with the right file, or one line and no file ---


def test_stalled_transfer_times_out_and_resumes(server, payload, tmp_path):
    server.fault(KEY, stall_after=100_000, stall=3.0)
    start = time.monotonic()
    dest = fetch(server, tmp_path / "obj.bin", timeout=0.5, md5=hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload
    assert time.monotonic() - start < 2.5  # gave up on the stall after the 0.5 s timeout
    assert server.requests_for(KEY)[1]["headers"]["Range"] == "bytes=100000-"


def test_reset_connection_is_retried_and_resumes(server, payload, tmp_path):
    server.fault(KEY, reset_after=150_000)
    server.fault(KEY, reset_after=0)
    dest = fetch(server, tmp_path / "obj.bin", size=len(payload), retries=2)
    assert dest.read_bytes() == payload
    ranges = [r["headers"].get("Range") for r in server.requests_for(KEY)]
    assert len(ranges) == 3 and ranges[0] is None and ranges[-1] is not None


def test_stalls_beyond_the_budget_give_one_line_and_a_resumable_part(server, tmp_path):
    for _ in range(3):
        server.fault(KEY, stall_after=0, stall=1.0)
    with pytest.raises(UserError, match=r"failed after 2 retries \(ReadTimeoutError\)") as err:
        fetch(server, tmp_path / "obj.bin", timeout=0.3, retries=2)
    assert "\n" not in str(err.value) and "run again to resume" in str(err.value)
    assert not (tmp_path / "obj.bin").exists()


def test_corrupt_transfer_is_fetched_again_from_scratch(server, payload, tmp_path):
    server.fault(KEY, corrupt=True)
    dest = fetch(server, tmp_path / "obj.bin", sha256=hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    assert [r["headers"].get("Range") for r in server.requests_for(KEY)] == [None, None]


def test_persistently_wrong_checksum_gives_one_line_and_no_file(server, payload, tmp_path):
    for _ in range(3):
        server.fault(KEY, corrupt=True)
    with pytest.raises(UserError, match="is corrupt \\(md5 checksum differs") as err:
        fetch(server, tmp_path / "obj.bin", md5=hashlib.md5(payload).hexdigest(), retries=2)
    assert "retries are used up" in str(err.value)
    assert len(server.requests_for(KEY)) == 3
    assert list(tmp_path.iterdir()) == []


def test_short_object_is_fetched_again_or_refused(server, payload, tmp_path):
    server.fault(KEY, length=1000)  # a complete answer, but not the whole object
    dest = fetch(server, tmp_path / "obj.bin", md5=hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload
    server.fault(KEY, length=1000)  # with the size known from the listing: the object changed
    with pytest.raises(UserError, match=f"has 1000 bytes but {len(payload)} were expected"):
        fetch(server, tmp_path / "other.bin", size=len(payload))
    assert list(tmp_path.iterdir()) == [dest]


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_html_page_is_never_taken_for_the_data(server, tmp_path, content_type):
    for _ in range(3):
        server.fault(KEY, html=True, content_type=content_type)
    with pytest.raises(UserError, match="HTML page") as err:
        fetch(server, tmp_path / "obj.bin", retries=2)  # no size or checksum to check against
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_cached_html_page_is_replaced(server, payload, tmp_path):
    dest = tmp_path / "obj.bin"
    dest.write_bytes(b"  <html><body>Access denied</body></html>")
    assert fetch(server, dest).read_bytes() == payload
