"""The registry of datasets `geoloc fetch` knows: where each file comes from, in what order, with what
checksum, how archive member names map to metadata ids, sizes, licences and terms.

The one home of this knowledge: fetch and evaluate read it, the README's data-sources table is checked
against `sources_table()` by a test. Core module: no typer, no rich, nothing heavy imported.

Facts as of 2026: the TIBHannover/GeoEstimation repository was emptied (code, history and release assets
gone), so nothing here points to it. Mirrors are listed durable hosts first (the Hugging Face Hub and
institutional servers before personal Git LFS copies); `fetch.mirrors` puts a user's own copies in front,
and a file put into <root>/meta/ by hand wins over all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from geoloc_cli.data.photo import IMAGE_SUFFIXES

_JHU = "http://www.cis.jhu.edu/~shraman/TransLocator"
_RAW = "https://raw.githubusercontent.com"
_TRANSLOCATOR = f"{_RAW}/ShramanPramanick/Transformer_Based_Geo-localization/main/resources"
_KEYANG = f"{_RAW}/keyang1211/GeoEstimation/original_tf/meta"


@dataclass(frozen=True)
class Remote:
    """One place a file can be fetched from: a plain URL, or a file in a Hugging Face Hub repository.

    `member` names a file inside a zip at that place (the file is then that member); `sha256` is the
    checksum of what the URL serves (of the member, when one is named), where it is known."""

    url: str = ""
    hf_repo: str = ""
    hf_path: str = ""
    repo_type: str = "dataset"  # "dataset" or "model"
    revision: str = "main"
    gated: bool = False  # the repository's terms must be accepted on its page before a token can read it
    member: str = ""
    sha256: str | None = None

    def describe(self) -> str:
        where = self.url or f"hf://{'' if self.repo_type == 'model' else 'datasets/'}{self.hf_repo}/{self.hf_path}"
        return where + (f" (member {self.member})" if self.member else "")

    @property
    def file_name(self) -> str:
        return (self.hf_path or self.url).rsplit("/", 1)[-1]

    @property
    def mirror_path(self) -> str:
        """Where a user's mirror (fetch.mirrors) holds this file: its path in its Hub repository, else its name."""
        return self.hf_path or self.file_name

    @property
    def host(self) -> str:
        """Short name of the host, for the README table."""
        if self.hf_repo:
            return f"Hugging Face `{self.hf_repo}`" + (" (gated)" if self.gated else "")
        return self.url.split("/")[2]


@dataclass(frozen=True)
class Archive:
    """Images as an archive: one file (zip, tar, tar.gz) or several that are read one after the other
    (`parts`: byte-split pieces of one tar, or several zips). Each part lists its mirrors in order.

    `rule` turns a member's file name into the key it is matched on (see member_key), and the
    metadata id into the same kind of key (see meta_key)."""

    kind: str  # "zip", "tar", "tar.gz" or "tar-parts" (byte-split tar, read as one stream)
    parts: tuple[tuple[Remote, ...], ...]
    rule: str = "name"
    size: str = ""

    @property
    def file_names(self) -> list[str]:
        return [part[0].file_name for part in self.parts]

    @property
    def label(self) -> str:
        return self.file_names[0] + (f" (+{len(self.parts) - 1} more)" if len(self.parts) > 1 else "")


@dataclass(frozen=True)
class MetaFile:
    """A metadata file stored as <root>/meta/<name>. `columns` renames a published file's columns to the
    *_places365.csv names (IMG_ID, LAT, LON); such a file is converted once on download."""

    name: str
    mirrors: tuple[Remote, ...]
    columns: dict[str, str] = field(default_factory=dict)
    gone: str = ""  # why no mirror is known, for the error message


@dataclass(frozen=True)
class Preset:
    name: str
    what: str
    meta: MetaFile  # positions (and scene labels): <name>_places365.csv
    archives: tuple[Archive, ...] = ()  # image archives, in the order they are tried
    urls: MetaFile | None = None  # an image_id,url list (Flickr), tried after the archives
    rows: int = 0
    size: str = ""
    licence: str = ""
    terms: str = ""
    splits: tuple[str, ...] = ()  # first = default; "{split}" in file names is replaced


def _hf(repo: str, path: str, **kw: object) -> Remote:
    return Remote(hf_repo=repo, hf_path=path, **kw)  # type: ignore[arg-type]


_MP16PRO = "Jia-py/MP16-Pro"
_G3 = "Jia-py/G3-checkpoint"
_FLICKR_TERMS = "Flickr photos under their authors' licences: research use, credit the authors"

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(
        "mp16", "MP-16 training set (MP16-Pro copy)",
        MetaFile("mp16_places365.csv", (
            _hf(_MP16PRO, "metadata/MP16_Pro_places365.csv", gated=True),
            Remote(url=f"{_JHU}/Annotations.zip", member="Annotations/mp16_places365.csv"),
            Remote(url="https://media.githubusercontent.com/media/Junchen-Ding/Geolocation/main/location/"
                       "mp16_places365.csv",
                   sha256="e3f55f378f70bce0ea893f476b17c73390999ad240cece867706ac1310dabc97"),
        )),
        archives=(Archive("tar-parts", tuple((_hf(_MP16PRO, f"mp-16-images{i:02d}", gated=True),)
                                             for i in range(19)), rule="mp16pro", size="~370 GB"),),
        urls=MetaFile("mp16_urls.csv", (_hf(_MP16PRO, "metadata/mp16_urls.csv", gated=True),)),
        rows=4_654_532, size="~370 GB, ~4.12 M images",
        licence="MP16-Pro: gated, academic use only (accept its terms on the Hub page)", terms=_FLICKR_TERMS,
    ),
    Preset(
        "yfcc25600", "YFCC25600 validation set",
        MetaFile("yfcc25600_places365.csv", (
            Remote(url=f"{_TRANSLOCATOR}/yfcc25600_places365.csv",
                   sha256="a49363ef7d87e8a2484169a2b0971f07355743d0741b9fcff7ffc8441afd397d"),)),
        urls=MetaFile("yfcc25600_urls.csv", (), gone=(
            "yfcc25600_urls.csv has no surviving public copy (it was only a GeoEstimation release asset, "
            "withdrawn in 2026)")),
        rows=25_600, size="25,600 images (URL list lost)", licence="YFCC100M: Creative Commons per photo",
        terms="research use; credit the authors",
    ),
    Preset(
        "im2gps", "Im2GPS test set",
        MetaFile("im2gps_places365.csv", (
            Remote(url=f"{_TRANSLOCATOR}/im2gps_places365.csv",
                   sha256="213c4d27f805c616948d582f20fe2bd4ab0c7a1ab5af08bee05f6481b0c7077f"),
            Remote(url=f"{_KEYANG}/im2gps_places365.csv",
                   sha256="213c4d27f805c616948d582f20fe2bd4ab0c7a1ab5af08bee05f6481b0c7077f"),
        )),
        archives=(
            Archive("zip", ((Remote(url="http://graphics.cs.cmu.edu/projects/im2gps/gps_query_imgs.zip"),),),
                    rule="cmu"),
            Archive("tar.gz", ((Remote(url=f"{_JHU}/Datasets/im2gps_rgb_images.tar.gz"),),)),
        ),
        rows=237, size="237 images", licence="Im2GPS (Hays & Efros 2008)", terms=_FLICKR_TERMS,
    ),
    Preset(
        "im2gps3k", "Im2GPS3k test set",
        MetaFile("im2gps3k_places365.csv", (
            _hf(_G3, "im2gps3k_places365.csv", repo_type="model",
                sha256="0f243d1e23cbb4ab8f0a83fa045ebae642dac2458fb94a1540db6f5f5588031d"),
            Remote(url=f"{_TRANSLOCATOR}/im2gps3k_places365.csv",
                   sha256="0f243d1e23cbb4ab8f0a83fa045ebae642dac2458fb94a1540db6f5f5588031d"),
            Remote(url=f"{_KEYANG}/im2gps3k_places365.csv",
                   sha256="0f243d1e23cbb4ab8f0a83fa045ebae642dac2458fb94a1540db6f5f5588031d"),
        )),
        archives=(
            Archive("zip", ((_hf("MatchaMacchiato/img2gps3k", "im2gps3ktest.zip"),),)),
            Archive("tar.gz", ((Remote(url=f"{_JHU}/Datasets/im2gps3k_rgb_images.tar.gz"),),)),
        ),
        rows=2_997, size="3,000 images", licence="Im2GPS3k (Vo et al. 2017)", terms=_FLICKR_TERMS,
    ),
    Preset(
        "yfcc4k", "YFCC4k test set",
        MetaFile("yfcc4k_places365.csv", (_hf(_G3, "yfcc4k_places365.csv", repo_type="model"),)),
        archives=(Archive("tar.gz", ((Remote(url=f"{_JHU}/Datasets/yfcc4k_rgb_images.tar.gz"),),)),),
        rows=4_536, size="4,536 images", licence="YFCC100M: Creative Commons per photo",
        terms="research use; credit the authors",
    ),
    Preset(
        "osv5m", "OpenStreetView-5M (street view; test split by default, --split train)",
        MetaFile("osv5m_places365.csv", (_hf("osv5m/osv5m", "{split}.csv"),),
                 columns={"id": "IMG_ID", "latitude": "LAT", "longitude": "LON"}),
        archives=(Archive("zip", (), rule="stem"),),  # parts per split: see _split_zips
        rows=210_122, size="test: 210 k images (~4 GB); train: 4.9 M (~ 100 GB)",
        licence="CC-BY-SA-4.0", terms="share alike; credit OpenStreetView-5M",
        splits=("test", "train"),
    ),
]}

# Image zips per split (images/<split>/NN.zip) of the presets with splits.
_SPLIT_ZIPS = {"osv5m": {"test": 5, "train": 98}}


def dataset_name(p: Preset, split: str | None) -> str:
    """osv5m's default split keeps the preset's name; another split gets its own dataset."""
    split = split or (p.splits[0] if p.splits else None)
    return p.name if not p.splits or split == p.splits[0] else f"{p.name}_{split}"


def with_split(p: Preset, split: str | None = None) -> Preset:
    """The preset with "{split}" resolved (presets without splits refuse a --split)."""
    if not p.splits:
        if split:
            raise ValueError(f"{p.name} has no splits")
        return p
    split = split or p.splits[0]
    if split not in p.splits:
        raise ValueError(f"{p.name}: unknown split {split!r} (known: {', '.join(p.splits)})")
    meta = MetaFile(f"{dataset_name(p, split)}_places365.csv",
                    tuple(_resolve(r, split) for r in p.meta.mirrors), p.meta.columns, p.meta.gone)
    archives = tuple(Archive(a.kind, a.parts or _split_zips(p.name, split), a.rule, a.size) for a in p.archives)
    return replace(p, meta=meta, archives=archives)


def _split_zips(name: str, split: str) -> tuple[tuple[Remote, ...], ...]:
    """OSV-5M's images: images/<split>/NN.zip, read one after the other."""
    return tuple((_hf("osv5m/osv5m", f"images/{split}/{i:02d}.zip"),) for i in range(_SPLIT_ZIPS[name][split]))


def _resolve(r: Remote, split: str) -> Remote:
    return replace(r, hf_path=r.hf_path.format(split=split), url=r.url.format(split=split))


# ------------------------------------------------------------------------------------------ id rules

# CMU's Im2GPS query images are named <Place>_<NNNNN>_<IMG_ID>, e.g. Paris_00042_123_abc.jpg.
_CMU = re.compile(r"^.+?_\d{5}_(?P<id>.+)$")
RULES = ("name", "stem", "cmu", "mp16pro")


def member_key(rule: str, member: str) -> str | None:
    """The key an archive member is matched on (None: not an image file, e.g. a folder or README)."""
    name = member.rstrip("/").rsplit("/", 1)[-1]
    if "." not in name or name.startswith("."):
        return None
    if "." + name.rsplit(".", 1)[-1].lower() not in IMAGE_SUFFIXES:
        return None
    if rule == "cmu":
        m = _CMU.match(name)
        return m["id"] if m else name
    if rule == "stem":
        return name.rsplit(".", 1)[0]
    return name  # "name", "mp16pro": the file name as it is


def member_keys(rule: str, member: str) -> list[str]:
    """The keys a member may match, best first: the rule's, then the plain file name and its stem (an id
    given with or without its extension)."""
    key = member_key(rule, member)
    if key is None:
        return []
    name = member.rsplit("/", 1)[-1]
    return list(dict.fromkeys([key, name, name.rsplit(".", 1)[0]]))


def meta_key(rule: str, img_id: str) -> str:
    """The key a metadata row's IMG_ID is matched on: MP16-Pro stores <aa>/<bb>/<id>.jpg as
    <aa>_<bb>_<id>.jpg; other rules compare the id's last path part."""
    if rule == "mp16pro":
        return img_id.replace("/", "_")
    return img_id.rsplit("/", 1)[-1]


# ------------------------------------------------------------------------------------------ README

def sources_table() -> str:
    """The README's data-sources table (Markdown), generated from the registry."""
    lines = ["| preset | metadata from | images from | size | licence / terms |", "|---|---|---|---|---|"]
    for p in map(with_split, PRESETS.values()):
        meta = ", ".join(dict.fromkeys(r.host for r in p.meta.mirrors))
        images = [f"{a.kind} ({', '.join(dict.fromkeys(r.host for part in a.parts for r in part))})"
                  for a in p.archives]
        if p.urls is not None:
            images.append("Flickr URL list " + (f"from {p.urls.mirrors[0].host}" if p.urls.mirrors
                                                 else "(no surviving copy)"))
        lines.append(f"| `{p.name}` | {meta} | {'; '.join(images)} | {p.size} | {p.licence}; {p.terms} |")
    return "\n".join(lines)
