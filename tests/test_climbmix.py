"""ClimbMix download through huggingface_hub, against a stand-in for the Hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants

from nightlab.lab import climbmix, datasets
from nightlab.lab.shards import iter_text_batches, shard_paths

COMMIT = "0123456789abcdef0123456789abcdef01234567"
VOCAB = 300


def shard_bytes(index: int, rows: int = 300) -> bytes:
    texts = [f"shard {index} document {i}: " + " ".join(["climb", "mix", "token", "bits"][(i + j) % 4]
                                                        for j in range(i % 50 + 5)) for i in range(rows)]
    out = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), out, row_group_size=64)
    return out.getvalue()


class HubStandIn:
    """Serves ``/datasets/<repo>/resolve/main/<file>`` the way the Hub does: HEAD with ETag, X-Repo-Commit and
    Content-Length; GET with byte ranges. A file in ``drop_once`` breaks off halfway on its first GET."""

    def __init__(self, files: dict[str, bytes], drop_once: set[str] = frozenset()) -> None:
        self.files, self.drop_once = files, set(drop_once)
        self.requests: list[tuple[str, str, str | None]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _file(self) -> tuple[str, bytes] | None:
                prefix = f"/datasets/{climbmix.REPO_ID}/resolve/main/"
                stand_in.requests.append((self.command, self.path, self.headers.get("Range")))
                name = self.path[len(prefix):] if self.path.startswith(prefix) else ""
                if name not in stand_in.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return name, stand_in.files[name]

            def _headers(self, status: int, data: bytes, length: int) -> None:
                self.send_response(status)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(length))

            def do_HEAD(self) -> None:
                if found := self._file():
                    self._headers(200, found[1], len(found[1]))
                    self.end_headers()

            def do_GET(self) -> None:
                if not (found := self._file()):
                    return
                name, data = found
                start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if "Range" in self.headers else 0
                if start:
                    self._headers(206, data, len(data) - start)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self._headers(200, data, len(data))
                self.end_headers()
                if name in stand_in.drop_once:
                    stand_in.drop_once.discard(name)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point huggingface_hub at ``url`` through its own settings (what HF_ENDPOINT sets at import)."""
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def shards() -> dict[str, bytes]:
    return {climbmix.shard_name(i): shard_bytes(i) for i in (0, 1, 2, climbmix.HOLDOUT_SHARD, climbmix.LAST_SHARD)}


def test_download_resumes_a_transfer_that_breaks_off(shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # write what arrives before the break
    names = [climbmix.shard_name(0), climbmix.shard_name(1), climbmix.shard_name(climbmix.LAST_SHARD)]
    with HubStandIn(shards, drop_once={names[1]}) as hub:
        use_endpoint(monkeypatch, hub.url)
        paths = climbmix.download(tmp_path, names, progress=False)
    assert [p.name for p in paths] == names
    for path in paths:
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(shards[path.name]).digest()
    gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith(names[1])]
    assert len(gets) == 2 and gets[0][2] is None
    assert gets[1][2] and int(gets[1][2].removeprefix("bytes=").rstrip("-")) > 0, "the retry asks for the rest only"
    assert not list(tmp_path.rglob("*.incomplete"))


def test_offline_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(datasets.DatasetError) as info:
        climbmix.download(tmp_path, [climbmix.shard_name(0)], progress=False)
    message = str(info.value)
    assert "\n" not in message and "offline" in message and "pycode" in message and "shard_00000" in message


@pytest.mark.slow
def test_unreachable_hub_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_endpoint(monkeypatch, closed_port())
    with pytest.raises(datasets.DatasetError) as info:
        climbmix.download(tmp_path, [climbmix.shard_name(0)], progress=False)
    assert "\n" not in str(info.value) and "unreachable" in str(info.value)


def test_a_missing_shard_is_named(shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubStandIn(shards) as hub:
        use_endpoint(monkeypatch, hub.url)
        with pytest.raises(datasets.DatasetError, match="shard_00007.parquet"):
            climbmix.download(tmp_path, [climbmix.shard_name(7)], progress=False)


def test_prepare_climbmix_with_hf_endpoint(shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "NIGHTLAB_HOME": str(home), "HF_HOME": str(tmp_path / "hf")}
    code = "from nightlab.lab import datasets; datasets.prepare('climbmix', %d, num_shards=2, progress=False)" % VOCAB
    with HubStandIn(shards) as hub:
        env["HF_ENDPOINT"] = hub.url
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    fetched = {r[1].rsplit("/", 1)[-1] for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]}
    assert fetched == {"shard_00000.parquet", "shard_00001.parquet", "shard_06541.parquet", "shard_06542.parquet"}

    prepared = datasets.open_prepared("climbmix", VOCAB, 2, home=home)
    m = prepared.manifest
    assert [(s["name"], s["split"]) for s in m["sources"]] == [
        ("shard_00000.parquet", "train"), ("shard_00001.parquet", "train"), ("shard_06542.parquet", "val"),
        ("shard_06541.parquet", "holdout")]
    assert all(s["sha256"] == hashlib.sha256(shards[s["name"]]).hexdigest() for s in m["sources"])
    assert m["details"]["num_shards"] == 2 and "06542" in m["split"]
    val_texts = pq.read_table(io.BytesIO(shards["shard_06542.parquet"])).column("text").to_pylist()
    served = [t for b in iter_text_batches(shard_paths(prepared.dir / "text", "val")) for t in b]
    assert served == val_texts and m["val_documents"] == len(val_texts)

    # everything is there now: preparing again, or with fewer shards, needs no network
    use_endpoint(monkeypatch, closed_port())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    assert datasets.prepare("climbmix", VOCAB, num_shards=2, home=home, progress=False) == prepared.dir
    smaller = datasets.prepare("climbmix", VOCAB, num_shards=1, home=home, progress=False)
    assert time.monotonic() - start < 20
    manifest = json.loads((smaller / "manifest.json").read_text())
    assert manifest["details"]["num_shards"] == 1 and len(manifest["sources"]) == 3
    assert manifest["corpus_hash"] != m["corpus_hash"]
    # a lab on one shard never rebuilds the data under a lab on two: each count has its own folder
    assert smaller != prepared.dir
    assert datasets.open_prepared("climbmix", VOCAB, 2, home=home).manifest == m
