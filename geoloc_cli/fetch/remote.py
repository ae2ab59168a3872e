"""Files from the dataset registry's remotes (data/sources.py): metadata CSVs, URL lists and image archives,
from a user's mirrors, the Hugging Face Hub (cache, resume, gated repos) or plain HTTP (resumable),
checked against their sha256; the reader side of fetch for what is not a photo."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import zipfile
from pathlib import Path

from geoloc_cli import console
from geoloc_cli.data import sources
from geoloc_cli.data.store import (
    DataRoot,
    atomic_path,
)
from geoloc_cli.errors import storage_error

MIRROR_TIMEOUT = 30.0


class Unavailable(Exception):
    """A source did not deliver a file (host gone, not found, bad checksum): try the next one."""


class Gated(Unavailable):
    """A gated Hugging Face repository refused us: the user has to accept its terms; never worked around."""


def _user_remotes(mirrors: list[str], file_path: str) -> list[sources.Remote]:
    """A user's mirrors of a file: <base>/<its path in its repository> (e.g. images/test/00.zip)."""
    return [sources.Remote(url=f"{base.rstrip('/')}/{file_path}") for base in mirrors]


def ensure_file(root: DataRoot, mf: sources.MetaFile, mirrors: list[str]) -> Path:
    """<root>/meta/<name> as it is when present (a file put there by hand wins), else from the first
    mirror that delivers it (the user's fetch.mirrors first), checksum checked, atomically."""
    dest = root.meta / mf.name
    if dest.is_file():
        return dest
    remotes = [*_user_remotes(mirrors, mf.name), *mf.mirrors]
    if not remotes:
        raise Unavailable(f"{mf.gone or mf.name + ': no mirror known'}: put a copy at {dest} or set fetch.mirrors to "
                          f"a host that has it")
    tried: list[Unavailable] = []
    for r in remotes:
        console.info(f"getting {mf.name} from {r.describe()}")
        try:
            src = fetch_remote(r, root)
            try:
                with atomic_path(dest) as tmp:
                    _materialize(src, r, tmp, mf.columns)
            finally:
                if not r.hf_repo:  # a URL's download was only the way here (the Hub's cache is the Hub's)
                    src.unlink(missing_ok=True)
            return dest
        except Unavailable as e:
            tried.append(e)
    gated = [e for e in tried if isinstance(e, Gated)]
    # Unavailable, not a final error: for a URL list the caller adds it to the other sources it tried
    raise (Gated if gated else Unavailable)(
        f"metadata file {mf.name} is missing: not in {dest.parent} and no mirror delivered it "
        f"(tried: {'; '.join(map(str, tried))}); put the file at {dest} or set fetch.mirrors to a copy"
        + (f". {gated[0]}" if gated else ""))


def fetch_remote(r: sources.Remote, root: DataRoot) -> Path:
    """The file a remote names, on disk: the Hub's cache, or <root>/downloads/ for a URL."""
    if r.hf_repo:
        return hf_file(r)
    parts = urllib.parse.urlsplit(r.url)
    # the whole host and path: files of one name from two places (OSV-5M's images/test/00.zip and
    # images/train/00.zip, or a mirror's copy) never share a download or a partial one
    return download_resumable(r.url, root.path / "downloads" / parts.netloc / parts.path.lstrip("/"))


def _materialize(src: Path, r: sources.Remote, dest: Path, columns: dict[str, str]) -> None:
    """Write the file (or its zip member) to dest, checking the checksum; rename columns when asked."""
    import shutil

    if r.member:
        try:
            with zipfile.ZipFile(src) as z, z.open(r.member) as f, open(dest, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise Unavailable(f"{r.describe()}: {e}") from None
    else:
        shutil.copyfile(src, dest)
    check_sha256(r, dest)
    if columns:
        _rename_columns(dest, columns)


def _rename_columns(path: Path, columns: dict[str, str]) -> None:
    """A published metadata file (OSV-5M's id, latitude, longitude) as *_places365.csv columns."""
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.rename(columns=columns).to_csv(path, index=False)


def check_sha256(r: sources.Remote, path: Path) -> None:
    """A file whose checksum is not the registry's is not the file: the next mirror is tried."""
    if not r.sha256:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != r.sha256:
        raise Unavailable(f"{r.describe()}: sha256 {h.hexdigest()} != expected {r.sha256}")


def obtain_part(root: DataRoot, part: tuple[sources.Remote, ...], mirrors: list[str]) -> Path:
    """One archive file from the first of its mirrors that delivers it (a complete earlier download is
    reused: the Hub's cache, or <root>/downloads/)."""
    file_name = part[0].file_name
    tried: list[Unavailable] = []
    for r in [*_user_remotes(mirrors, part[0].mirror_path), *part]:
        console.info(f"getting {file_name} from {r.describe()}")
        try:
            path = fetch_remote(r, root)
            try:
                check_sha256(r, path)
            except Unavailable:
                if not r.hf_repo:  # not kept for the next run to reuse
                    path.unlink()
                raise
            return path
        except Unavailable as e:
            tried.append(e)
    gated = [e for e in tried if isinstance(e, Gated)]
    raise gated[0] if gated else Unavailable(f"{file_name}: {'; '.join(map(str, tried))}")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hf_file(r: sources.Remote) -> Path:
    """A file of a Hub repository through huggingface_hub: cached and resumed by it; HF_ENDPOINT,
    HF_HUB_OFFLINE and HF_TOKEN (or the token of `hf auth login`) are read now, not at its import."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(
            r.hf_repo, r.hf_path, repo_type=r.repo_type, revision=r.revision,
            endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None,
            local_files_only=_env_true("HF_HUB_OFFLINE")))
    except GatedRepoError:
        raise Gated(gate_message(r)) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if r.gated and status in (401, 403):
            raise Gated(gate_message(r)) from None
        raise Unavailable(f"{r.describe()}: HTTP {status}") from None
    except LocalEntryNotFoundError:
        raise Unavailable(f"{r.describe()}: not in the local Hugging Face cache (HF_HUB_OFFLINE is set, or the "
                          "Hub did not answer)") from None
    except (OSError, ValueError, EntryNotFoundError) as e:
        raise Unavailable(f"{r.describe()}: {type(e).__name__}: {str(e)[:80]}") from None


def gate_message(r: sources.Remote) -> str:
    page = f"https://huggingface.co/{'' if r.repo_type == 'model' else 'datasets/'}{r.hf_repo}"
    return (f"{r.hf_repo} is a gated repository and this account has no access: accept its terms on {page} "
            "(signed in), then give a token via HF_TOKEN or `hf auth login`")


def download_resumable(url: str, dest: Path) -> Path:
    """GET url to dest through dest.part, continuing a part left by an earlier run (HTTP Range)."""
    import httpx

    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "geoloc", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        with httpx.stream("GET", url, headers=headers, timeout=MIRROR_TIMEOUT, follow_redirects=True) as r:
            if r.status_code == 416 and have:  # the part is already complete
                part.replace(dest)
                return dest
            r.raise_for_status()
            with open(part, "ab" if r.status_code == 206 else "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
    except httpx.HTTPError as e:
        raise Unavailable(f"{url} ({type(e).__name__}: {str(e)[:80]})") from None
    except OSError as e:  # our disk, not the mirror: trying the next mirror would not help
        raise storage_error(e, f"writing {part}") from None
    part.replace(dest)
    return dest

