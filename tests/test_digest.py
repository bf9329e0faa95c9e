"""File digests, in the foreground and in the background."""

from __future__ import annotations

import hashlib
import os

import pytest

from sparqcli.digest import BackgroundSha256, sha256_file
from sparqcli.errors import InputError

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_sha256(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == ABC_SHA256


def test_background_digests_of_several_files(tmp_path):
    paths = []
    for index, content in enumerate([b"abc", b"", bytes(range(256)) * 40_000]):
        paths.append(tmp_path / f"f{index}")
        paths[-1].write_bytes(content)
    digests = BackgroundSha256(paths)
    assert digests.result(paths[2]) == hashlib.sha256(paths[2].read_bytes()).hexdigest()
    assert digests.result(paths[0]) == ABC_SHA256
    assert digests.result(paths[1]) == hashlib.sha256(b"").hexdigest()


def test_an_unreadable_file_raises_when_its_digest_is_asked_for(tmp_path):
    missing = tmp_path / "missing"
    digests = BackgroundSha256([missing])
    with pytest.raises(InputError, match=rf"^{missing}: cannot read: No such file or directory$"):
        digests.result(missing)


def test_cancelled_hashing_stops(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(bytes(64 << 20))
    with pytest.raises(InputError, match=rf"^{path}: hashing cancelled$"):
        sha256_file(path, _set_event())
    # A FIFO holds the background thread at its first read until the test writes: it is
    # cancelled by then, so it stops at that block, whatever the scheduling.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    digests = BackgroundSha256([fifo])
    digests.cancel()
    with open(fifo, "wb") as writer:
        writer.write(bytes(1 << 20))
    with pytest.raises(InputError, match=rf"^{fifo}: hashing cancelled$"):
        digests.result(fifo)


def _set_event():
    import threading

    event = threading.Event()
    event.set()
    return event
