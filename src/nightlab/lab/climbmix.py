"""The ``climbmix`` dataset: the public ClimbMix Parquet shards on the Hugging Face Hub.

Shards ``shard_00000.parquet`` ... ``shard_06542.parquet`` of the dataset repository
``karpathy/climbmix-400b-shuffle``; the first ``num_shards`` are training, the last one is pinned as
validation and the one before it as the sealed holdout (scored for kept experiments only; a folder
prepared before the holdout existed gets it added at its next ``prepare``, train and val unchanged). Files are fetched with ``huggingface_hub`` (which honours ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE``, and resumes a transfer that breaks off mid-file) into
``<cache>/downloads/climbmix/``, shared by every vocabulary size, and linked into the dataset's
``text/`` folder. A shard already downloaded is not fetched again.
"""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nightlab.config import CLIMBMIX_HOLDOUT_SHARD, CLIMBMIX_LAST_SHARD
from nightlab.lab import progress as progress_bars
from nightlab.lab.shards import DatasetError, TextIndex, file_sha256, sources_hash

REPO_ID = "karpathy/climbmix-400b-shuffle"
LAST_SHARD = CLIMBMIX_LAST_SHARD  # shard_06542.parquet: the pinned validation shard
HOLDOUT_SHARD = CLIMBMIX_HOLDOUT_SHARD  # shard_06541.parquet: the pinned holdout shard
DOWNLOAD_WORKERS = 8  # shards fetched at once

SPLIT_RULE = f"validation = shard_{LAST_SHARD:05d}.parquet (the last shard); training = shard_00000 ... shard_(N-1)"
HOLDOUT_RULE = f"holdout = shard_{HOLDOUT_SHARD:05d}.parquet (the shard before the validation shard)"
HOLDOUT_TEXT = "holdout-00000.parquet"  # its name in text/


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_names(num_shards: int) -> tuple[list[str], str]:
    """Training shard names and the validation shard name."""
    if not 1 <= num_shards <= HOLDOUT_SHARD:
        raise ValueError(f"num_shards = {num_shards}: choose between 1 and {HOLDOUT_SHARD} training shards")
    return [shard_name(i) for i in range(num_shards)], shard_name(LAST_SHARD)


def _byte_counter(bar: progress_bars.Bar):
    """A tqdm class for ``hf_hub_download`` that feeds every file's byte counts into one shared progress bar."""
    from tqdm import tqdm  # deferred: only a download needs it (huggingface_hub's progress class)

    lock = threading.Lock()
    expected = [0]

    class Bytes(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            with lock:
                expected[0] += int(kwargs.get("total") or 0) - int(kwargs.get("initial") or 0)
                bar.set_total(expected[0] or None)

        def update(self, n: float | None = 1) -> bool | None:
            bar.advance(int(n or 0))
            return None

    return Bytes


def download(dest: Path, names: list[str], *, progress: bool = True, workers: int = DOWNLOAD_WORKERS) -> list[Path]:
    """Fetch the named shards into ``dest`` in parallel; returns their paths in the same order."""
    from huggingface_hub import constants, hf_hub_download  # deferred: SDK, only a download needs it
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    dest.mkdir(parents=True, exist_ok=True)
    missing = [n for n in names if not (dest / n).is_file()]
    with progress_bars.bar(f"downloading {len(missing)} ClimbMix shards", None, enabled=progress and bool(missing),
                           unit="B") as bar:
        tqdm_class = _byte_counter(bar)

        def fetch(name: str) -> Path:
            if (dest / name).is_file():
                return dest / name
            try:
                path = hf_hub_download(REPO_ID, name, repo_type="dataset", local_dir=dest, tqdm_class=tqdm_class)
            except (LocalEntryNotFoundError, OfflineModeIsEnabled):
                have = sum((dest / n).is_file() for n in names)
                raise DatasetError(
                    f"cannot download ClimbMix {name} from {constants.ENDPOINT} (offline, or the Hub is unreachable; "
                    f"{have} of {len(names)} shards are in {dest}): connect and run `nightlab prepare` again, "
                    "or use --dataset pycode, which needs no network") from None
            except HfHubHTTPError as e:
                raise DatasetError(f"cannot download ClimbMix {name} from {constants.ENDPOINT}: "
                                   f"{str(e).splitlines()[0]}") from None
            return Path(path)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fetch, names))


def link(src: Path, dst: Path) -> None:
    """Hard-link a downloaded shard into ``text/`` (a copy where links are not possible)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build(num_shards: int, text_dir: Path, downloads: Path, *, progress: bool = True) -> TextIndex:
    """Download the shards and place them in ``text_dir`` as ``train-00000.parquet`` ..., ``val-00000.parquet``
    and ``holdout-00000.parquet``."""
    train_names, val_name = shard_names(num_shards)
    paths = download(downloads, train_names + [val_name], progress=progress)
    sources = []
    for i, path in enumerate(paths):
        split = "val" if path.name == val_name else "train"
        link(path, text_dir / ("val-00000.parquet" if split == "val" else f"train-{i:05d}.parquet"))
        sources.append({"name": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size, "split": split})
    index = TextIndex(sources=sources, split=SPLIT_RULE, corpus_hash=sources_hash(sources, SPLIT_RULE),
                      details={"repo": REPO_ID, "num_shards": num_shards})
    return add_holdout(index, text_dir, downloads, progress=progress)


def add_holdout(index: TextIndex, text_dir: Path, downloads: Path, *, progress: bool = True) -> TextIndex:
    """``index`` with the holdout shard downloaded and linked into ``text_dir``; train, val and the
    corpus hash (of train and val) stay as they were."""
    path = download(downloads, [shard_name(HOLDOUT_SHARD)], progress=progress)[0]
    target = Path(text_dir) / HOLDOUT_TEXT
    target.unlink(missing_ok=True)
    link(path, target)
    source = {"name": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size, "split": "holdout"}
    sources = [s for s in index.sources if s["split"] != "holdout"] + [source]
    return TextIndex(sources=sources, split=index.split, corpus_hash=index.corpus_hash, details=index.details,
                     holdout=HOLDOUT_RULE)
