"""S2 cell ids and great-circle distances, vectorised with numpy.

`cell_ids` reproduces s2sphere bit for bit:
    s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(lat, lon)).parent(level).id()
It performs the same floating-point operations in the same order (degrees -> radians -> unit vector ->
face and (u, v) -> quadratic (s, t) projection -> integer (i, j)), so results agree exactly, then walks
the same Hilbert curve with a 6-bit table derived from S2's; tests/test_geo.py checks all of it against
s2sphere itself. Points are processed in cache-sized chunks on a few threads.

Ids are numpy uint64. A cell at level L has its lowest set bit at position 2 * (30 - L); its
descendants are exactly the ids in [id - lsb + 1, id + lsb - 1] (`cell_range`), which is what makes
containment a range test and lets the partitioning work on sorted ids.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from geoloc_cli.errors import InputError

MAX_LEVEL = 30
MAX_SIZE = 1 << MAX_LEVEL
EARTH_RADIUS_KM = 6371.0

_LOOKUP_BITS = 4
_SWAP, _INVERT = 0x01, 0x02
_POS_TO_IJ = ((0, 1, 3, 2), (0, 2, 3, 1), (3, 2, 0, 1), (3, 1, 0, 2))
_POS_TO_ORIENTATION = (_SWAP, 0, 0, _INVERT | _SWAP)
_U64 = np.uint64
_CHUNK = 1 << 15
_THREADS = min(4, os.cpu_count() or 1)


def _build_lookup() -> tuple[np.ndarray, np.ndarray]:
    """The Hilbert-curve tables of S2 (ij + orientation <-> position + orientation, 4 bits at a time)."""
    size = 1 << (2 * _LOOKUP_BITS + 2)
    pos_table = np.zeros(size, dtype=np.int64)
    ij_table = np.zeros(size, dtype=np.int64)

    def fill(level: int, i: int, j: int, orig: int, pos: int, orientation: int) -> None:
        if level == _LOOKUP_BITS:
            ij = (i << _LOOKUP_BITS) + j
            pos_table[(ij << 2) + orig] = (pos << 2) + orientation
            ij_table[(pos << 2) + orig] = (ij << 2) + orientation
            return
        r = _POS_TO_IJ[orientation]
        for index in range(4):
            fill(level + 1, (i << 1) + (r[index] >> 1), (j << 1) + (r[index] & 1), orig,
                 (pos << 2) + index, orientation ^ _POS_TO_ORIENTATION[index])

    for orientation in (0, _SWAP, _INVERT, _SWAP | _INVERT):
        fill(0, 0, 0, orientation, 0, orientation)
    return pos_table, ij_table


_LOOKUP_POS, _LOOKUP_IJ = _build_lookup()  # POS is what S2 itself uses; we look up with _LOOKUP_POS6


def _trig_is_libm() -> bool:
    """True if numpy's sin/cos agree with Python's math module (libm) on a probe set.

    Some numpy builds use SIMD approximations accurate to a few ulp; s2sphere uses `math`, and one ulp
    can move a point across a face or leaf-cell edge. Where they differ we fall back to `math`.
    """
    x = np.linspace(-math.pi, math.pi, 4001)
    py = np.array([(math.sin(v), math.cos(v)) for v in x.tolist()])
    return bool(np.array_equal(np.sin(x), py[:, 0]) and np.array_equal(np.cos(x), py[:, 1]))


_NUMPY_TRIG_OK = _trig_is_libm()


def _sin_cos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if _NUMPY_TRIG_OK:
        return np.sin(x), np.cos(x)
    values = x.tolist()
    return np.array([math.sin(v) for v in values]), np.array([math.cos(v) for v in values])


def _as_float_array(values: Iterable[float] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float64).reshape(-1)


def _check_level(level: int) -> None:
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"S2 level must be in 0..{MAX_LEVEL}, got {level}")


def lsb_for_level(level: int) -> np.uint64:
    _check_level(level)
    return _U64(1 << (2 * (MAX_LEVEL - level)))


def cell_ids(lat_deg: np.ndarray, lon_deg: np.ndarray, level: int = MAX_LEVEL) -> np.ndarray:
    """S2 cell ids (uint64) of points given in degrees, at `level` (30 = leaf cells)."""
    _check_level(level)
    lat, lon = _as_float_array(lat_deg), _as_float_array(lon_deg)
    if lat.shape != lon.shape:
        raise ValueError(f"lat and lon differ in length: {lat.size} vs {lon.size}")
    out = np.empty(lat.shape, dtype=_U64)
    # Cache-sized chunks on a few threads: numpy releases the GIL inside each operation, and small
    # chunks keep the ~50 temporaries per point in L2 instead of streaming them through memory.
    chunks = [slice(k, k + _CHUNK) for k in range(0, lat.size, _CHUNK)]

    def work(sl: slice) -> None:
        out[sl] = _leaf_ids(lat[sl], lon[sl])

    if len(chunks) > 1 and _THREADS > 1:
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(work, chunks))
    else:
        for sl in chunks:
            work(sl)
    return out if level == MAX_LEVEL else parent(out, level)


def _leaf_ids(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    # Same operations as LatLng.from_degrees(...).to_point(): radians(x) is x * (pi / 180).
    sin_lat, cos_lat = _sin_cos(np.radians(lat))
    sin_lon, cos_lon = _sin_cos(np.radians(lon))
    face, i, j = _xyz_to_face_ij(cos_lon * cos_lat, sin_lon * cos_lat, sin_lat)
    return _face_ij_to_id(face, i, j)


def _xyz_to_face_ij(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """s2sphere's xyz_to_face_uv + uv_to_st + st_to_ij.

    Face = axis of the largest |component| (ties broken as Point.largest_abs_component), + 3 when that
    component is negative. Faces 0/1/2 take (u, v) = (p, q) / comp with (p, q) = (y, z), (-x, z),
    (-x, -y); faces 3/4/5 take (q, p) / comp. The swap is done on the integer (i, j) afterwards, which
    is the same thing because uv -> st -> ij is applied to u and v separately.
    """
    ax, ay, az = np.abs(x), np.abs(y), np.abs(z)
    x_gt_y = ax > ay
    is_x = x_gt_y & (ax > az)
    is_y = ~x_gt_y & (ay > az)
    is_z = ~(is_x | is_y)
    # Selections as exact 0/1 arithmetic (value * 1 + other * 0, each mask converted once): measured
    # faster than np.where, which branches on every element of these unpredictable masks.
    mx, my, mz = is_x.astype(np.float64), is_y.astype(np.float64), is_z.astype(np.float64)
    comp = x * mx + y * my + z * mz
    p = y * mx - x * (1.0 - mx)
    q = z * (1.0 - mz) - y * mz
    negative = comp < 0
    a = _st_to_ij(_uv_to_st(p / comp))
    b = _st_to_ij(_uv_to_st(q / comp))
    swap = (a ^ b) & -negative.astype(np.int32)
    face = is_y.astype(np.int32) + 2 * is_z + 3 * negative
    return face, a ^ swap, b ^ swap


def _uv_to_st(u: np.ndarray) -> np.ndarray:
    # Quadratic projection. 1 - 3u == 1 + 3|u| exactly for u < 0, so one sqrt serves both branches.
    half = 0.5 * np.sqrt(1 + 3 * np.abs(u))
    return np.where(u >= 0, half, 1 - half)


def _st_to_uv(s: np.ndarray) -> np.ndarray:
    return np.where(s >= 0.5, (1.0 / 3.0) * (4 * s * s - 1), (1.0 / 3.0) * (1 - 4 * (1 - s) * (1 - s)))


def _st_to_ij(s: np.ndarray) -> np.ndarray:
    # s is in [0, 1] (|u| <= 1 because the face axis has the largest component), so truncation is
    # floor and only the upper clamp of s2sphere's max(0, min(MAX_SIZE - 1, floor(...))) can bite.
    return np.minimum((MAX_SIZE * s).astype(np.int32), MAX_SIZE - 1)


def _build_lookup6() -> np.ndarray:
    """Position table for 6 bits of i and j at a time: index (i6 << 8) | (j6 << 2) | orientation,
    value (12-bit position << 2) | new orientation. Built by walking S2's Hilbert curve one level per
    bit; int16 keeps the table (32 KB) in L1 cache, which is what makes the lookups fast."""
    bits = 6
    index = np.arange(1 << (2 * bits + 2), dtype=np.int64)
    i6, j6, orientation = index >> (bits + 2), (index >> 2) & ((1 << bits) - 1), index & 3
    ij_to_pos = np.zeros((4, 4), dtype=np.int64)
    for o in range(4):
        for pos, ij in enumerate(_POS_TO_IJ[o]):
            ij_to_pos[o, ij] = pos
    flips = np.array(_POS_TO_ORIENTATION)
    position = np.zeros_like(index)
    for k in range(bits - 1, -1, -1):
        digit = ij_to_pos[orientation, (((i6 >> k) & 1) << 1) | ((j6 >> k) & 1)]
        position = (position << 2) | digit
        orientation = orientation ^ flips[digit]
    return ((position << 2) | orientation).astype(np.int16)


_LOOKUP_POS6 = _build_lookup6()


def _face_ij_to_id(face: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Leaf cell id from face and (i, j): the Hilbert position, looked up 6 bits of i and j at a time."""
    i, j = i.astype(np.int32, copy=False), j.astype(np.int32, copy=False)  # 30 bits: int32 halves the traffic
    n = face.astype(_U64) << _U64(60)
    bits = (face & _SWAP).astype(np.int32)
    for k in range(4, -1, -1):
        shift = 6 * k
        index = (((i >> shift) & 0x3F) << 8) | (((j >> shift) & 0x3F) << 2) | bits
        value = np.take(_LOOKUP_POS6, index, mode="clip")  # 'clip' skips the bounds check
        n |= (value >> 2).astype(_U64) << _U64(2 * shift)
        bits = (value & 3).astype(np.int32)
    return (n << _U64(1)) | _U64(1)


def _id_to_face_ij(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `_face_ij_to_id` (s2sphere's to_face_ij_orientation without the orientation)."""
    ids = np.asarray(ids, dtype=_U64)
    face = (ids >> _U64(61)).astype(np.int64)
    bits = face & _SWAP
    i = np.zeros(ids.shape, dtype=np.int64)
    j = np.zeros(ids.shape, dtype=np.int64)
    for k in range(7, -1, -1):
        nbits = MAX_LEVEL - 7 * _LOOKUP_BITS if k == 7 else _LOOKUP_BITS
        chunk = ((ids >> _U64(k * 2 * _LOOKUP_BITS + 1)) & _U64((1 << (2 * nbits)) - 1)).astype(np.int64)
        bits = _LOOKUP_IJ[bits + (chunk << 2)]
        i += (bits >> (_LOOKUP_BITS + 2)) << (k * _LOOKUP_BITS)
        j += ((bits >> 2) & ((1 << _LOOKUP_BITS) - 1)) << (k * _LOOKUP_BITS)
        bits &= _SWAP | _INVERT
    return face, i, j


def parent(ids: np.ndarray, level: int) -> np.ndarray:
    """Ancestors at `level` (each id must be at `level` or deeper, as in s2sphere)."""
    lsb = lsb_for_level(level)
    ids = np.asarray(ids, dtype=_U64)
    return (ids & ~(lsb - _U64(1))) | lsb


def level_of(ids: np.ndarray) -> np.ndarray:
    """S2 level of each id (int64); -1 for id 0, which is no cell."""
    ids = np.asarray(ids, dtype=_U64)
    lowest = ids & (~ids + _U64(1))
    # The lowest set bit is a power of two, exact in float64: frexp gives its exponent + 1.
    trailing_zeros = np.frexp(lowest.astype(np.float64))[1] - 1
    return np.where(ids == 0, -1, MAX_LEVEL - trailing_zeros // 2).astype(np.int64)


def cell_range(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(range_min, range_max): the leaf ids inside each cell are exactly those in this closed range."""
    ids = np.asarray(ids, dtype=_U64)
    below = (ids & (~ids + _U64(1))) - _U64(1)
    return ids - below, ids + below


def to_token(ids: np.ndarray) -> list[str]:
    """S2 tokens: 16 hex digits with trailing zeros stripped ('X' for id 0, as in the C++ library)."""
    ids = np.asarray(ids, dtype=_U64).reshape(-1)
    text = ids.astype(">u8").tobytes().hex()
    return [text[k : k + 16].rstrip("0") or "X" for k in range(0, len(text), 16)]


def token_to_id(token: str) -> int:
    """One token to its integer id; ValueError on anything that is not 1-16 hex digits (or 'X')."""
    t = token.strip()
    if t in ("X", "x"):
        return 0
    if not 1 <= len(t) <= 16 or any(c not in "0123456789abcdefABCDEF" for c in t):
        raise ValueError(f"not an S2 token: {token!r}")
    return int(t.ljust(16, "0"), 16)


def from_token(tokens: Iterable[str]) -> np.ndarray:
    """S2 tokens to uint64 ids (inverse of `to_token`)."""
    return np.array([token_to_id(t) for t in tokens], dtype=_U64)


def is_valid(ids: np.ndarray) -> np.ndarray:
    """Face < 6 and the lowest set bit at an even position (s2sphere's CellId.is_valid)."""
    ids = np.asarray(ids, dtype=_U64)
    lowest = ids & (~ids + _U64(1))
    return ((ids >> _U64(61)) < _U64(6)) & ((lowest & _U64(0x1555555555555555)) != _U64(0))


def _face_uv_to_xyz(face: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    one = np.ones_like(u)
    x = np.choose(face, [one, -u, -u, -one, v, v])
    y = np.choose(face, [u, one, -v, -v, -one, u])
    z = np.choose(face, [v, v, one, -u, -u, -one])
    return np.stack([x, y, z])


def _cell_corners_uv(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(face, u, v) of the 4 vertices of each cell, (N, 4) each, in s2sphere's get_vertex order (CCW)."""
    ids = np.asarray(ids, dtype=_U64).reshape(-1)
    face, i, j = _id_to_face_ij(ids)
    size = np.int64(1) << (MAX_LEVEL - level_of(ids))
    lo_i, lo_j = i & -size, j & -size
    u0, u1 = _st_to_uv(lo_i / MAX_SIZE), _st_to_uv((lo_i + size) / MAX_SIZE)
    v0, v1 = _st_to_uv(lo_j / MAX_SIZE), _st_to_uv((lo_j + size) / MAX_SIZE)
    # vertex k = (u[(k >> 1) ^ (k & 1)], v[k >> 1])
    return face, np.stack([u0, u1, u1, u0], axis=1), np.stack([v0, v0, v1, v1], axis=1)


def _uv_to_latlng(face: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    faces = np.broadcast_to(face.reshape(-1, *([1] * (u.ndim - 1))), u.shape)
    x, y, z = _face_uv_to_xyz(faces.ravel(), u.ravel(), v.ravel())
    lat = np.degrees(np.arctan2(z, np.hypot(x, y))).reshape(u.shape)
    lon = np.degrees(np.arctan2(y, x)).reshape(u.shape)
    return lat, lon


def cell_vertices(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) in degrees, shape (N, 4): the corners of each cell (s2sphere Cell.get_vertex order)."""
    return _uv_to_latlng(*_cell_corners_uv(ids))


def cell_outlines(ids: np.ndarray, points_per_edge: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) in degrees, shape (N, 4 * points_per_edge): each cell's boundary, counter-clockwise.

    Cell edges are straight lines in (u, v), i.e. great-circle arcs; sampling them (never exactly at a
    corner, so never exactly at a pole) gives polygons that look right on a lat/lon map.
    """
    face, cu, cv = _cell_corners_uv(ids)
    t = (np.arange(points_per_edge) + 0.5) / points_per_edge
    nxt = [1, 2, 3, 0]
    us = np.concatenate([cu[:, [k]] + (cu[:, [nxt[k]]] - cu[:, [k]]) * t for k in range(4)], axis=1)
    vs = np.concatenate([cv[:, [k]] + (cv[:, [nxt[k]]] - cv[:, [k]]) * t for k in range(4)], axis=1)
    return _uv_to_latlng(face, us, vs)


def haversine_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance in km (R = 6371) between points in degrees; inputs broadcast.

    E.g. lat1 of shape (N, 1) against lat2 of shape (1, C) gives the (N, C) distance matrix.
    """
    p1, p2 = np.radians(np.asarray(lat1, dtype=np.float64)), np.radians(np.asarray(lat2, dtype=np.float64))
    dlat = p2 - p1
    dlon = np.radians(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    a = np.sin(dlat / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


# --------------------------------------------------------------------------------------------------
# Input checks shared by every reader of positions (fetch --meta, partition)

COORDINATE_LIMITS = {"LAT": 90.0, "LON": 180.0}


def check_coordinates(values: np.ndarray, raw: Any, column: str, path: Any, first_line: int,
                      allow_missing: bool = False) -> None:
    """Refuse a latitude beyond +-90 or a longitude beyond +-180 (or a missing one unless allowed) with
    the file, the 1-based line and the column; `raw` holds the cells as read, for the message."""
    limit = COORDINATE_LIMITS[column]
    values = np.asarray(values, dtype=np.float64)
    bad = np.abs(values) > limit
    if not allow_missing:
        bad |= np.isnan(values)
    if bad.any():
        row = int(np.argmax(bad))
        cell = raw.iloc[row] if hasattr(raw, "iloc") else raw[row]
        shown = repr(cell) if isinstance(cell, str) else repr(float(cell))  # 91.0, never np.float64(91.0)
        raise InputError(f"{path}: line {first_line + row}, column {column}: {shown} is not a number in "
                         f"[-{limit:g}, {limit:g}]")
