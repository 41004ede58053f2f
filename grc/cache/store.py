"""Content-addressed stores for stage outputs.

Layout (local folder and remote server alike, the shape Bazel's HTTP remote cache uses):
  cas/<sha256>   one stage output file, named by its digest
  ac/<key>       the action record of a task key: {"stage", "files": [{path, sha256, bytes}]}
Every object is checked against its digest when it is restored or downloaded; a corrupted or
truncated object is deleted and the stage rebuilds, it is never used. The remote store speaks
plain HTTP GET/PUT/HEAD, so any WebDAV-capable server (nginx's dav module) can hold it.
"""

from __future__ import annotations

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

CHUNK = 1 << 20


def default_dir() -> Path:
    return Path(os.environ.get("GRC_CACHE_DIR") or Path.home() / ".cache" / "grc")


@dataclass
class Events:
    """What the cache did during one build, for the report and `grc cache stats`."""

    log: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.log.append(text)


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
        try:
            os.link(src, tmp)  # no copy of multi-GB shards; the artifact becomes read-only too
        except OSError:
            shutil.copyfile(src, tmp)
        self.adopt(tmp, digest)  # hashed by the stage that wrote it

    def incoming(self, digest: str) -> Path:
        """A temporary path beside the object's, for a download to be ``adopt``ed."""
        dest = self._cas(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest.with_name(f".{digest}.{os.getpid()}.download")

    def adopt(self, tmp: Path, digest: str) -> Path:
        """Install a file beside the store (a download, a link to a built artifact) whose sha256 the
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
        return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"

    def verified_blob(self, digest: str, size: int) -> Path | None:
        """The object's path if its size and sha256 are right; a bad object is deleted.

        Hashing multi-GB shards on every restore would cost seconds, so (like git's index) a
        verified object gets a stamp of its size, mtime and inode; while the stat still matches
        the stamp the hash is trusted. Any write to the object changes its mtime, so a flipped
        byte or a truncation is re-hashed and caught; ``grc cache verify`` re-hashes everything."""
        path = self._cas(digest)
        if not path.is_file():
            return None
        stamp = self._stamp(digest)
        if path.stat().st_size == size and stamp.is_file() and stamp.read_text() == self._stat_line(path):
            return path
        if path.stat().st_size != size or sha256_file(path) != digest:
            path.unlink(missing_ok=True)
            stamp.unlink(missing_ok=True)
            return None
        write_file(stamp, self._stat_line(path).encode())
        return path

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
    """A local store, optionally backed by a remote one. Remote failures degrade to a miss."""

    def __init__(self, local: LocalStore, remote: HttpStore | None = None):
        self.local = local
        self.remote = remote

    def lookup(self, key: str, events: Events) -> dict[str, Any] | None:
        record = self.local.get_record(key)
        if record is None and self.remote is not None:
            try:
                record = self.remote.get_record(key)
            except (OSError, urllib.error.URLError) as exc:
                events.note(f"remote cache unreachable ({exc}); building")
                return None
            if record is not None:
                events.note("action found in the remote store")
        return record

    def _fetch(self, digest: str, size: int, events: Events) -> Path | None:
        path = self.local.verified_blob(digest, size)
        if path is not None or self.remote is None:
            if path is None:
                events.note(f"object {digest[:12]} missing or corrupt in the local store")
            return path
        tmp = self.local.incoming(digest)
        try:
            got = self.remote.download(digest, tmp)
        except (OSError, urllib.error.URLError) as exc:
            tmp.unlink(missing_ok=True)
            events.note(f"remote object {digest[:12]} unavailable ({exc})")
            return None
        if got != (size, digest):
            tmp.unlink(missing_ok=True)
            events.note(f"remote object {digest[:12]} is missing, truncated or corrupt: discarded")
            return None
        return self.local.adopt(tmp, digest)

    def restore(self, record: dict[str, Any], dest: Path, events: Events) -> bool:
        """Materialise every file of a record into ``dest``; False (and nothing usable) on any miss."""
        sources = []
        for f in record["files"]:
            blob = self._fetch(f["sha256"], f["bytes"], events)
            if blob is None:
                return False
            sources.append((blob, dest / f["path"]))
        for blob, target in sources:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(blob, target)  # objects are read-only, so sharing the inode is safe
            except OSError:
                shutil.copyfile(blob, target)
        return True

    def save(self, key: str, stage: str, folder: Path, known: dict[str, str], events: Events) -> None:
        """Store a built folder; ``known`` maps file names to digests a stage already computed."""
        files: list[dict[str, Any]] = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = str(path.relative_to(folder))
            digest = known.get(rel) or sha256_file(path)
            self.local.put_blob(path, digest)
            files.append({"path": rel, "sha256": digest, "bytes": path.stat().st_size})
        record = {"stage": stage, "key": key, "files": files, "grc": __version__}
        self.local.put_record(key, record)
        if self.remote is not None and not self.remote.read_only:
            try:
                for f in files:
                    if not self.remote.has_blob(f["sha256"]):
                        self.remote.put_blob(
                            self.local.verified_blob(f["sha256"], f["bytes"]) or folder / f["path"], f["sha256"]
                        )
                self.remote.put_record(key, record)
                events.note("uploaded to the remote store")
            except (OSError, urllib.error.URLError) as exc:
                events.note(f"remote upload failed ({exc}); the local store has it")
