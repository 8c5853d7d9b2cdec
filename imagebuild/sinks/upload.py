"""Blob uploads to one repository: skipped, mounted, sent whole or in chunks, a few at a time.

Each blob is first asked for (HEAD), unless ``BlobOrigins`` already knows the repository
holds it (should the registry then refuse the manifest for a blob it lacks,
``push_then_put`` asks for each and sends again what is missing); one the
repository has is not sent. One known to live in another repository of the
same registry (``BlobOrigins``: pulled from there, or pushed there earlier in the run) is
mounted from it: ``POST …/blobs/uploads/?mount=<digest>&from=<repo>``
answers 201 when the registry linked it, or 202 with an upload session when it declined, which
is then used as usual. A blob up to ``CHUNKED_THRESHOLD`` goes up in one PUT; a bigger one in
``PATCH`` chunks of ``CHUNK_SIZE`` (each with its ``Content-Range``, each to the ``Location``
the last answer gave), closed by a PUT ``?digest=``. A registry that refuses chunks (405, 501,
a 404 or a 416 on the first one) gets the blob whole on a fresh session. Bodies are read from
the blob's file a mebibyte at a time, whatever its size.

Retries: every request goes through the shared client's retry transport (``net.http``), which
sends a chunk or a PUT again after a 408, a 429 (waiting what ``Retry-After`` asks, capped), a
5xx or a reset, within the request's deadline; bodies are ``httpx.ByteStream``s re-reading
their file, so they may be sent twice. What that leaves is closed here: a chunk the registry
took although its answer was lost gets a 416 when sent again, and the upload resumes where
the registry's status (``GET`` on the session, its ``Range``) says it is; an upload session
the registry dropped (a 404, as distribution answers once a body broke off part-way) is
started afresh, as many times in all as the client's retry policy allows attempts.

``BlobUploader.push_all`` sends several blobs ``PARALLEL_UPLOADS`` at a time. The first failure
stops the rest: blobs not started are not started, and uploads under way stop at their next
mebibyte. The error raised is that of the first blob, in the order given, that failed, so the
message does not depend on which thread lost the race.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from imagebuild.digest import Digest
from imagebuild.errors import RegistryError
from imagebuild.image.descriptor import Descriptor
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.net.http import RetryPolicy
from imagebuild.sinks.auth import Op, RegistrySession

PARALLEL_UPLOADS = 4
"""Blobs uploaded at once by ``push_all``."""
CHUNKED_THRESHOLD = 64 << 20
"""Blobs larger than this many bytes go up in chunks; smaller ones in one PUT."""
CHUNK_SIZE = 16 << 20
"""Bytes per chunk (a registry's ``OCI-Chunk-Min-Length`` raises it)."""

BLOBS_UNKNOWN = frozenset({"MANIFEST_BLOB_UNKNOWN", "BLOB_UNKNOWN"})
"""The codes a registry refuses a manifest with when the repository lacks a blob it lists."""

_READ = 1 << 20  # bytes read from a blob file at a time
_RESUMES = 2  # 416s answered by asking the registry where the upload stands, per upload
_OCTET = "application/octet-stream"
_RANGE = re.compile(r"(?:bytes=)?0-(\d+)")


class BlobsUnknown(RegistryError):
    """A manifest refused: its repository does not hold a blob it lists."""


class _Cancelled(Exception):
    """Another blob's upload failed: this one stops where it is."""


class _SessionLost(Exception):
    """The registry dropped the upload session; ``error`` is what to report if it persists."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(error.message)
        self.error = error


class _FileRange(httpx.ByteStream):
    """Bytes ``[offset, offset + length)`` of a file as a request body, read afresh each time.

    It is an ``httpx.ByteStream`` because that is what the retry transport knows it may send
    twice; unlike one, it never holds more than a mebibyte of the file. It stops (raising
    ``_Cancelled``) once ``cancel`` is set.
    """

    def __init__(self, path: Path, offset: int, length: int, cancel: threading.Event) -> None:
        super().__init__(b"")
        self._path, self._offset, self._length, self._cancel = path, offset, length, cancel

    def __iter__(self) -> Iterator[bytes]:
        left = self._length
        if left <= 0:
            return
        with self._path.open("rb") as f:
            f.seek(self._offset)
            while left > 0:
                if self._cancel.is_set():
                    raise _Cancelled
                chunk = f.read(min(_READ, left))
                if not chunk:
                    return  # the file shrank: the registry's digest check will say so
                left -= len(chunk)
                yield chunk


class BlobOrigins:
    """Which repositories each blob is known to be in: where a push may mount it from.

    A client fills it as it pulls (every blob a pulled manifest lists) and pushes (every blob
    a repository was found to hold or was sent). A source the registry refused to mount from
    (no right to pull it) is not offered again for that target. Safe to share between threads.
    """

    def __init__(self) -> None:
        self._seen: dict[Digest, list[tuple[str, str]]] = {}
        self._refused: set[tuple[str, str, str]] = set()  # (registry, target, source)
        self._lock = threading.Lock()

    def remember(self, ref: ImageReference, digest: Digest) -> None:
        """Note that ``ref``'s repository holds ``digest``."""
        where = (ref.registry, ref.repository)
        with self._lock:
            places = self._seen.setdefault(digest, [])
            if where in places:
                places.remove(where)
            places.append(where)  # the most recent last

    def refuse(self, ref: ImageReference, source: str) -> None:
        """Note that ``ref``'s registry would not mount from ``source`` into ``ref``."""
        with self._lock:
            self._refused.add((ref.registry, ref.repository, source))

    def holds(self, ref: ImageReference, digest: Digest) -> bool:
        """Whether ``ref``'s repository is known to hold ``digest`` (``remember``)."""
        with self._lock:
            return (ref.registry, ref.repository) in self._seen.get(digest, ())

    def places(self, digest: Digest) -> list[tuple[str, str]]:
        """Every ``(registry, repository)`` known to hold ``digest``, the most recent first."""
        with self._lock:
            return list(reversed(self._seen.get(digest, ())))

    def source(self, ref: ImageReference, digest: Digest) -> str | None:
        """Another repository of ``ref``'s registry known to hold ``digest`` (None: none)."""
        with self._lock:
            places = list(self._seen.get(digest, ()))
            refused = {s for r, t, s in self._refused if (r, t) == (ref.registry, ref.repository)}
        for registry, repository in reversed(places):
            if registry == ref.registry and repository not in refused | {ref.repository}:
                return repository
        return None


@dataclass(frozen=True, slots=True)
class _Session:
    """An upload session the registry opened: where to send to, and its smallest chunk."""

    url: httpx.URL
    min_chunk: int


class BlobUploader:
    """Pushes blobs from ``store`` to ``op.ref``'s repository through ``session``.

    ``origins`` is the client's record of where blobs live (read to mount, added to after each
    blob); ``policy`` is the client's retry policy, which bounds how often an upload whose
    session the registry dropped is started again, and how long to wait before. ``fetch``
    brings a blob ``store`` lacks into it, from where ``origins`` saw it: a blob the build
    took from a registry without its bytes (``RegistryLayerCache(fetch_blobs=False)``) is
    mounted, and fetched only when its bytes must be sent. ``trusting``: a blob ``origins``
    knows the repository holds is taken as there, without a HEAD.
    """

    def __init__(
        self,
        session: RegistrySession,
        op: Op,
        store: BlobStore,
        *,
        origins: BlobOrigins,
        policy: RetryPolicy,
        fetch: Callable[[Descriptor], None] | None = None,
        trusting: bool = True,
    ) -> None:
        self._session, self._op, self._store = session, op, store
        self._origins, self._policy, self._fetch = origins, policy, fetch
        self._trusting = trusting
        self._cancel = threading.Event()
        self._trusted = threading.Event()

    @property
    def took_on_trust(self) -> bool:
        """Whether a blob was skipped as held without asking the registry (``push``)."""
        return self._trusted.is_set()

    def push_all(
        self, blobs: Sequence[Descriptor], progress: Callable[[int], None] | None = None
    ) -> None:
        """Push ``blobs``, ``PARALLEL_UPLOADS`` at a time; ``progress(n)`` after each success.

        The first failure stops the others (see the module doc) and is raised once every
        upload under way has stopped: the error of the first blob, in order, that failed.
        """
        if len(blobs) <= 1:
            for desc in blobs:
                self.push(desc)
                if progress is not None:
                    progress(1)
            return
        pool = ThreadPoolExecutor(
            max_workers=min(PARALLEL_UPLOADS, len(blobs)), thread_name_prefix="imgbuild-push"
        )
        futures = [pool.submit(self._push_or_stop_all, desc) for desc in blobs]
        done = 0
        try:
            for future in as_completed(futures):
                if future.exception() is not None:
                    break
                done += 1
                if progress is not None:
                    progress(done)
        finally:
            if done < len(futures):
                self._cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
        _raise_first_failure(futures)

    def push_image_blobs(
        self,
        layers: Sequence[Descriptor],
        config: Descriptor,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Push an image's ``layers`` (``push_all``), then its ``config``.

        The config (a few hundred bytes) goes once the layers are in, so a registry always
        sees layers, then the config, then (the caller's) manifest. ``progress(n)`` after
        each layer, and once more when the config is in.
        """
        self.push_all(layers, progress)
        self.push(config)
        if progress is not None:
            progress(len(layers) + 1)

    def _push_or_stop_all(self, desc: Descriptor) -> None:
        try:
            self.push(desc)
        except BaseException:
            self._cancel.set()  # before this worker takes the next blob off the queue
            raise

    def push(self, desc: Descriptor) -> None:
        """Upload one blob unless the repository has it: mounted, whole, or in chunks.

        A blob ``origins`` knows the repository holds (a manifest read there lists it, or
        this run pushed it there) is not asked for again, unless the uploader was made not
        ``trusting``: a CI runner pushing to the repository its registry cache lives in
        asked for each cached layer it had just found there. Were one gone since, the
        manifest's PUT is refused (``push_then_put`` then asks again).
        """
        self._check()
        if self._trusting and self._origins.holds(self._op.ref, desc.digest):
            self._trusted.set()
            return
        if self.exists(desc.digest):
            self._origins.remember(self._op.ref, desc.digest)
            return
        path = self._store.path(desc.digest)
        if not path.is_file() and self._fetch is None:
            raise self._missing(desc)
        attempt = 1
        while True:
            try:
                self._upload(desc, path)
                break
            except _SessionLost as lost:
                if attempt >= self._policy.attempts:
                    raise lost.error from None
                self._policy.sleep(self._policy.delay(attempt, None))
                attempt += 1
        self._origins.remember(self._op.ref, desc.digest)

    def exists(self, digest: Digest) -> bool:
        """Whether the repository holds ``digest`` (HEAD)."""
        op = self._op
        url = self._session.url(op.ref, f"blobs/{digest}")
        resp = self._session.send(op, "HEAD", url, follow_redirects=True)
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._session.status_error(op, resp, f"blob {digest} check")

    def _check(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled

    def _missing(self, desc: Descriptor) -> RegistryError:
        return RegistryError(
            f"pushing {self._op.ref}: blob {desc.digest} is missing from {self._store.root}",
            hint="rebuild the image",
        )

    def _upload(self, desc: Descriptor, path: Path) -> None:
        session = self._start(desc, mount=True)
        if session is None:
            return  # mounted
        if not path.is_file() and self._fetch is not None:
            self._fetch(desc)  # its bytes are sent: fetched from where it was seen
        if not path.is_file():
            raise self._missing(desc)
        offset = 0
        if desc.size > CHUNKED_THRESHOLD:
            sent = self._send_chunks(desc, path, session)
            if sent is not None:
                session, offset = _Session(sent, session.min_chunk), desc.size
            else:  # the registry takes no chunks: the whole blob, on a session of its own
                session = self._start(desc, mount=False)
                if session is None:
                    return
        self._finish(desc, path, session.url, offset)

    def _start(self, desc: Descriptor, *, mount: bool) -> _Session | None:
        """Open an upload session; None when the blob was mounted from another repository."""
        op = self._op
        url = self._session.url(op.ref, "blobs/uploads/")
        source = self._origins.source(op.ref, desc.digest) if mount else None
        headers = {"Content-Length": "0"}
        if source is not None:
            query = {"mount": desc.digest, "from": source}
            # The token must let us read the source too, or the registry declines the mount.
            mounting = replace(op, also=(f"repository:{source}:pull",))
            resp = self._session.send(
                mounting, "POST", url.copy_merge_params(query), headers=headers
            )
            if resp.status_code == 201:
                return None
            if resp.status_code == 202:
                return self._session_of(resp, desc)
            # Refused (no right to pull the source, say): an upload costs bytes, not success.
            if resp.status_code in (401, 403):
                self._origins.refuse(op.ref, source)
        resp = self._session.send(op, "POST", url, headers=headers)
        if resp.status_code not in (201, 202):
            raise self._session.status_error(op, resp, f"upload of blob {desc.digest}")
        return self._session_of(resp, desc)

    def _session_of(self, resp: httpx.Response, desc: Descriptor) -> _Session:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(
                f"pushing {self._op.ref}: upload of blob {desc.digest} started without a "
                "Location header",
                hint="the registry does not follow the distribution API; report it",
            )
        minimum = resp.headers.get("OCI-Chunk-Min-Length", "")
        # Location may be relative and may carry session state in its query: keep it.
        return _Session(resp.url.join(location), int(minimum) if minimum.isdigit() else 0)

    def _send_chunks(self, desc: Descriptor, path: Path, session: _Session) -> httpx.URL | None:
        """PATCH the blob in chunks; the session's last URL, or None if chunks are refused."""
        op, size = self._op, desc.size
        chunk = max(CHUNK_SIZE, session.min_chunk, 1)
        url, offset, resumes = session.url, 0, 0
        while offset < size:
            self._check()
            length = min(chunk, size - offset)
            headers = {
                "Content-Type": _OCTET,
                "Content-Range": f"{offset}-{offset + length - 1}",
                "Content-Length": str(length),
            }
            body = _FileRange(path, offset, length, self._cancel)
            resp = self._session.send(op, "PATCH", url, headers=headers, content=_replay(body))
            if resp.status_code == 202:
                url = _next_url(resp, url)
                offset += length
                continue
            if resp.status_code == 416 and resumes < _RESUMES:
                resumes += 1
                found = self._status(url, offset + length)
                if found is not None and found[1] > 0:
                    url, offset = found
                    continue
            if offset == 0 and resp.status_code in (404, 405, 416, 501):
                return None
            error = self._session.status_error(op, resp, f"upload of blob {desc.digest}")
            if resp.status_code in (404, 416):  # the session is gone, or lost its place
                raise _SessionLost(error)
            raise error
        return url

    def _status(self, url: httpx.URL, most: int) -> tuple[httpx.URL, int] | None:
        """Where the upload at ``url`` stands: its URL and the next offset (at most ``most``)."""
        resp = self._session.send(self._op, "GET", url)
        match = _RANGE.fullmatch(resp.headers.get("Range", "").strip())
        if resp.status_code != 204 or match is None:
            return None
        offset = int(match.group(1)) + 1
        return (_next_url(resp, url), offset) if offset <= most else None

    def _finish(self, desc: Descriptor, path: Path, url: httpx.URL, offset: int) -> None:
        """PUT what is left of the blob from ``offset`` (all of it, or nothing after chunks)."""
        op = self._op
        self._check()
        left = desc.size - offset
        body = _FileRange(path, offset, left, self._cancel)
        done = self._session.send(
            op,
            "PUT",
            url.copy_add_param("digest", desc.digest),
            headers={"Content-Type": _OCTET, "Content-Length": str(left)},
            content=_replay(body),
        )
        if done.status_code in (201, 204):
            return
        # A registry that failed after storing the blob (or a retried PUT whose first attempt
        # got through, its upload session now gone) has the blob: only a missing one is lost.
        retried = done.status_code in (404, 408, 429) or done.status_code >= 500
        if retried and self.exists(desc.digest):
            return
        error = self._session.status_error(op, done, f"upload of blob {desc.digest}")
        if done.status_code == 404:
            raise _SessionLost(error)
        raise error


def push_then_put(
    uploader: Callable[[bool], BlobUploader],
    layers: Sequence[Descriptor],
    config: Descriptor,
    put: Callable[[], Digest],
    progress: Callable[[int], None] | None = None,
) -> Digest:
    """Push ``layers`` and ``config`` (``push_image_blobs``), then ``put`` their manifest.

    ``uploader(trusting)`` makes the uploader. A blob taken as held (no HEAD: a manifest read
    in the repository lists it) that the registry no longer holds gets the manifest refused
    (``BlobsUnknown``): each blob is then asked for, what is missing sent, and the manifest
    put again, once. A refusal when nothing was taken as held stands.
    """
    first = uploader(True)
    first.push_image_blobs(layers, config, progress)
    try:
        return put()
    except BlobsUnknown:
        if not first.took_on_trust:
            raise
    uploader(False).push_image_blobs(layers, config)
    return put()


def _replay(body: _FileRange) -> Callable[[], httpx.SyncByteStream]:
    """The session's body factory for ``body``, which re-reads its file each time it is sent."""
    return lambda: body


def _next_url(resp: httpx.Response, current: httpx.URL) -> httpx.URL:
    """The session URL an answer points to next (its ``Location``), else the current one."""
    location = resp.headers.get("Location")
    return resp.url.join(location) if location else current


def _raise_first_failure(futures: Sequence[Future[None]]) -> None:
    """Raise the failure of the first future, in order, that failed (a stop is not one)."""
    stopped = False
    for future in futures:
        if future.cancelled():
            stopped = True
            continue
        exc = future.exception()
        if isinstance(exc, _Cancelled):
            stopped = True
        elif exc is not None:
            raise exc
    if stopped:  # only stops and no failure: never leave the caller thinking all went up
        raise RegistryError("pushing stopped before every blob was uploaded")
