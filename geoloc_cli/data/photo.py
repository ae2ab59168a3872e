"""Reading a photo the same way in every stage: RGB conversion and the EXIF GPS position (Pillow only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

# Photo files every stage takes (fetch's folders and archives, predict); Pillow decodes each of them.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


def photos_in(folder: Path) -> list[Path]:
    """The photo files below a folder, sorted; none is an error (fetch's folder import and predict)."""
    from geoloc_cli.errors import InputError

    found = sorted(f for f in Path(folder).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not found:
        raise InputError(f"{folder}: no photos found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


GPS_IFD = 0x8825
ORIENTATION = 0x0112


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white (not black), 16-bit/float greyscale stretched."""
    if im.mode == "RGB":
        return im
    import numpy as np
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-9) * 255
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def exif_gps(im: Image.Image) -> tuple[float, float] | None:
    """(lat, lon) in degrees from the EXIF GPS block, or None when absent or malformed. Exactly (0, 0) is
    taken as absent: it is what cameras without a fix write, not a photo from the Gulf of Guinea."""
    try:
        gps = im.getexif().get_ifd(GPS_IFD)
        lat, lon = dms(gps[2]), dms(gps[4])
        lat = -lat if str(gps.get(1, "N")).upper().startswith("S") else lat
        lon = -lon if str(gps.get(3, "E")).upper().startswith("W") else lon
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError, IndexError, SyntaxError):
        return None
    ok = -90 <= lat <= 90 and -180 <= lon <= 180 and (lat, lon) != (0.0, 0.0)  # also False for NaN
    return (lat, lon) if ok else None


def dms(v: Any) -> float:
    """Degrees from EXIF's (degrees, minutes, seconds) rationals."""
    d, m, s = (float(x) for x in v)
    return d + m / 60 + s / 3600
