"""Content-addressed stores for stage outputs.

Layout (local folder and remote server alike, the shape Bazel's HTTP remote cache uses):
  cas/<sha256>   one stage output file, named by its digest
  ac/<key>       the action record of a task key: {"stage", "key", "grc", "tree": [...]}, the output
                 folder's every folder, file (sha256, bytes, mode) and link (grc/build/tree.py)
Objects are private copies (reflinks where the filesystem has them), never hard links to an
artifact: an edit of a built or restored output cannot reach the store. Every object is checked
against its digest when it is restored or downloaded: a local object is hashed again whenever its
stat (size, mtime, ctime, inode) differs from the one recorded when it was last verified, and ctime
cannot be set back, so a flipped byte is caught even with the mtime restored. A corrupted or
truncated object is deleted, reported (build output and report) and the stage rebuilds; it is never
used. The remote store speaks plain HTTP GET/PUT/HEAD, so any WebDAV-capable server (nginx's dav
module) can hold it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from grc import __version__
from grc.build.atomic import write_file
from grc.build.fingerprint import sha256_file
from grc.build.tree import Entry, UnsafeTree, escapes, from_json, to_json

CHUNK = 1 << 20
FICLONE = 0x40049409  # linux/fs.h: share the source's extents (btrfs, XFS); refused elsewhere


def default_dir() -> Path:
    return Path(os.environ.get("GRC_CACHE_DIR") or Path.home() / ".cache" / "grc")


@dataclass
class Events:
    """What the cache did during one build, for the report and `grc cache stats`."""

    log: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # also printed: the user must hear of them

    def note(self, text: str) -> None:
        self.log.append(text)

    def warn(self, text: str) -> None:
        self.log.append(text)
        self.warnings.append(text)


def clone_file(src: Path, dst: Path) -> None:
    """A private copy of ``src`` at ``dst``: a reflink where the filesystem shares extents (instant,
    no space), else a byte copy. Never a hard link: a write to one must never reach the other, and
    read-only modes do not stop root."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


class LocalStore:
    def __init__(self, root: Path):
        self.root = root

    def _cas(self, digest: str) -> Path:
        return self.root / "cas" / digest[:2] / digest

    def _ac(self, key: str) -> Path:
        return self.root / "ac" / key[:2] / key

    def get_record(self, key: str) -> dict[str, Any] | None:
        path = self._ac(key)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        os.utime(path)  # last use, for prune
        return record

    def put_record(self, key: str, record: dict[str, Any]) -> None:
        write_file(self._ac(key), json.dumps(record, indent=1, sort_keys=True).encode())

    def has_blob(self, digest: str) -> bool:
        return self._cas(digest).is_file()

    def put_blob(self, src: Path, digest: str) -> None:
        dest = self._cas(digest)
        if dest.is_file():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{digest}.{os.getpid()}.tmp")
        clone_file(src, tmp)
        self.adopt(tmp, digest)  # hashed by the stage that wrote it

    def incoming(self, digest: str) -> Path:
        """A temporary path beside the object's, for a download to be ``adopt``ed."""
        dest = self._cas(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest.with_name(f".{digest}.{os.getpid()}.download")

    def adopt(self, tmp: Path, digest: str) -> Path:
        """Install a file beside the store (a download, a copy of a built artifact) whose sha256 the
        caller knows: read-only, stamped as verified (so it is not hashed again on restore)."""
        dest = self._cas(digest)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
        write_file(self._stamp(digest), self._stat_line(dest).encode())
        return dest

    def _stamp(self, digest: str) -> Path:
        return self._cas(digest).with_name(f".{digest}.ok")

    @staticmethod
    def _stat_line(path: Path) -> str:
        st = path.stat()
        return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"

    def check_blob(self, digest: str, size: int) -> tuple[Path | None, str]:
        """(the object's path, "") if its size and sha256 are right; else (None, what is wrong:
        "missing", or the damage found, the object then deleted).

        Hashing multi-GB shards on every restore would cost seconds, so (like git's index) a
        verified object gets a stamp of its size, mtime, ctime and inode; while the stat still
        matches the stamp the hash is trusted. Any write changes the ctime, which no one can set
        back, so a flipped byte is re-hashed and caught; ``grc cache verify`` re-hashes everything."""
        path = self._cas(digest)
        if not path.is_file():
            return None, "missing"
        stamp = self._stamp(digest)
        actual = path.stat().st_size
        if actual == size and stamp.is_file() and stamp.read_text() == self._stat_line(path):
            return path, ""
        problem = ""
        if actual != size:
            problem = f"truncated or overwritten: {actual} bytes, its record says {size}"
        elif sha256_file(path) != digest:
            problem = "corrupt: its content no longer has the sha256 it is named by"
        if problem:
            path.unlink(missing_ok=True)
            stamp.unlink(missing_ok=True)
            return None, problem
        write_file(stamp, self._stat_line(path).encode())
        return path, ""

    def objects(self) -> list[Path]:  # stamps and temp files start with a dot
        return [p for p in (self.root / "cas").rglob("*") if p.is_file() and not p.name.startswith(".")]

    def records(self) -> list[Path]:
        return [p for p in (self.root / "ac").rglob("*") if p.is_file() and not p.name.startswith(".")]


T = TypeVar("T")


def _read_all(resp: Any) -> bytes:
    return bytes(resp.read())


class HttpStore:
    """GET/PUT/HEAD of /cas/<digest> and /ac/<key> on a plain HTTP (WebDAV-capable) server."""

    def __init__(self, url: str, read_only: bool, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.read_only = read_only
        self.timeout = timeout

    def _request(
        self,
        method: str,
        path: str,
        data: bytes | BinaryIO | None = None,
        size: int | None = None,
        consume: Callable[[Any], T] = _read_all,  # type: ignore[assignment]  # T = bytes by default
    ) -> T | None:
        """One request; ``consume(response)`` (default: the whole body), or None on 404. A file
        ``data`` is sent as it is read (``size`` bytes)."""
        headers = {"Content-Length": str(size)} if size is not None else {}
        req = urllib.request.Request(f"{self.url}/{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return consume(resp)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def get_record(self, key: str) -> dict[str, Any] | None:
        raw = self._request("GET", f"ac/{key}")
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def put_record(self, key: str, record: dict[str, Any]) -> None:
        self._request("PUT", f"ac/{key}", json.dumps(record, sort_keys=True).encode())

    def has_blob(self, digest: str) -> bool:
        return self._request("HEAD", f"cas/{digest}") is not None

    def download(self, digest: str, dest: Path) -> tuple[int, str] | None:
        """Stream cas/<digest> into ``dest`` (1 MiB at a time: multi-GB shards never sit in
        memory), hashing as it goes; (bytes, sha256) or None when the server has no such object."""

        def save(resp: Any) -> tuple[int, str]:
            h, size = hashlib.sha256(), 0
            with open(dest, "wb") as out:
                while chunk := resp.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            return size, h.hexdigest()

        return self._request("GET", f"cas/{digest}", consume=save)

    def put_blob(self, src: Path, digest: str) -> None:
        """Upload streamed from the file (the request body is read 8 KiB at a time)."""
        with open(src, "rb") as body:
            self._request("PUT", f"cas/{digest}", body, size=src.stat().st_size)


class Cache:
    """A local store, optionally backed by a remote one. Remote failures degrade to a miss, with a warning."""

    def __init__(self, local: LocalStore, remote: HttpStore | None = None):
        self.local = local
        self.remote = remote

    def lookup(self, key: str, events: Events) -> dict[str, Any] | None:
        record = self.local.get_record(key)
        if record is None and self.remote is not None:
            try:
                record = self.remote.get_record(key)
            except (OSError, urllib.error.URLError) as exc:
                events.warn(f"remote cache {self.remote.url} unreachable ({exc}); building")
                return None
            if record is not None:
                events.note("action found in the remote store")
        return record

    def _fetch(self, entry: Entry, events: Events) -> Path | None:
        digest, size = entry.sha256, entry.bytes
        path, problem = self.local.check_blob(digest, size)
        if problem != "missing" and path is None:
            events.warn(f"cache object {digest[:12]} ({entry.path}) is {problem}; removed from {self.local.root}")
        if path is not None or self.remote is None:
            return path
        tmp = self.local.incoming(digest)
        try:
            got = self.remote.download(digest, tmp)
        except (OSError, urllib.error.URLError) as exc:
            tmp.unlink(missing_ok=True)
            events.warn(f"remote object {digest[:12]} ({entry.path}) unavailable ({exc})")
            return None
        if got is None:
            tmp.unlink(missing_ok=True)
            events.note(f"remote object {digest[:12]} ({entry.path}) is missing")
            return None
        if got != (size, digest):
            tmp.unlink(missing_ok=True)
            events.warn(
                f"remote object {digest[:12]} ({entry.path}) is truncated or corrupt "
                f"({got[0]} bytes, sha256 {got[1][:12]}): discarded"
            )
            return None
        return self.local.adopt(tmp, digest)

    def restore(self, record: dict[str, Any], dest: Path, events: Events) -> list[Entry] | None:
        """Recreate the recorded tree in the empty folder ``dest`` (folders, files with their modes,
        links); its entries, or None (and nothing usable) when an object is missing or bad."""
        try:
            entries = from_json(record.get("tree"))
        except UnsafeTree as exc:
            events.warn(f"action record {record.get('key', '?')[:12]} is unusable ({exc}); building")
            return None
        blobs = {}
        for e in entries:
            if e.kind == "file":
                blob = self._fetch(e, events)
                if blob is None:
                    return None
                blobs[e.path] = blob
        for e in entries:  # parents come before their contents (a top-down walk recorded them)
            target = dest / e.path
            if e.kind == "dir":
                target.mkdir()
            elif e.kind == "file":
                clone_file(blobs[e.path], target)
                os.chmod(target, e.mode)
            else:
                os.symlink(e.target, target)
        for e in reversed(entries):  # last: a read-only folder must not stop what goes inside it
            if e.kind == "dir":
                os.chmod(dest / e.path, e.mode)
        return entries

    def save(self, key: str, stage: str, folder: Path, entries: list[Entry], events: Events) -> None:
        """Store a built folder whose tree (digests included) is ``entries``."""
        outside = [e.path for e in entries if escapes(e)]
        if outside:
            events.warn(f"not stored in the build cache: {', '.join(outside)} points outside {folder}")
            return
        files = [e for e in entries if e.kind == "file"]
        record = {"stage": stage, "key": key, "tree": to_json(entries), "grc": __version__}
        try:
            for e in files:
                self.local.put_blob(folder / e.path, e.sha256)
            self.local.put_record(key, record)
        except OSError as exc:  # the settings were checked when the build began; this is the disk
            events.warn(f"could not store {stage} in the local build cache {self.local.root}: {exc}")
            return
        if self.remote is not None and not self.remote.read_only:
            try:
                for e in files:
                    if not self.remote.has_blob(e.sha256):
                        self.remote.put_blob(self.local.check_blob(e.sha256, e.bytes)[0] or folder / e.path, e.sha256)
                self.remote.put_record(key, record)
                events.note("uploaded to the remote store")
            except (OSError, urllib.error.URLError) as exc:
                events.warn(f"remote upload failed ({exc}); the local store has it")
