"""Running an exported checkpoint with ONNX Runtime: no torch, timm or transformers imported.

The files come from `geoloc export` (geoloc_cli.model.export): CKPT.onnx (the network), CKPT.seg.onnx (its
segmenter) and CKPT.onnx.json; the checkpoint's fingerprint is in the JSON and in each model's
metadata. Preprocessing is the numpy twin of the torch path (inference.views / segmenter_input /
segmentation.encode_seg), so both backends see the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geoloc_cli.errors import InputError, install_hint

if TYPE_CHECKING:
    from PIL import Image

FINGERPRINT_KEY = "geoloc_checkpoint_fingerprint"
_SAMPLE = 1 << 16


def onnx_paths(ckpt: Path, out: Path | None = None) -> tuple[Path, Path]:
    """(network file, segmenter file) of a checkpoint's export: model.safetensors -> model.onnx, model.seg.onnx."""
    net = Path(out) if out is not None else Path(ckpt).with_suffix(".onnx")
    return net, seg_path(net)


def seg_path(net: Path) -> Path:
    """The embedded segmenter's graph of an export: model.onnx -> model.seg.onnx."""
    return net.with_suffix(".seg.onnx")


def rgb_path(net: Path) -> Path:
    """The RGB-branch graph of a split export: model.onnx -> model.rgb.onnx."""
    return net.with_suffix(".rgb.onnx")


def split_export(spec: dict[str, Any]) -> bool:
    """Whether a model is exported as two graphs (RGB branch; seg branch + fusion + heads): late or gated
    fusion with a seg branch, whose branches meet only at their features."""
    return bool(spec["seg_channels"]) and spec["fusion"] != "exchange"


def stamp_path(net: Path) -> Path:
    """The small JSON beside the export that records which checkpoint it came from (checked before loading)."""
    return net.with_name(net.name + ".json")


def fingerprint(ckpt: Path) -> str:
    """A cheap content fingerprint of a checkpoint: its size, safetensors header (names, shapes, metadata)
    and 64 KiB of weights at the start, middle and end - enough to tell a retrained file from its export."""
    path = Path(ckpt)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        h.update(f.read(header_len))
        for pos in (8 + header_len, max((size - _SAMPLE) // 2, 0), max(size - _SAMPLE, 0)):
            f.seek(pos)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()[:32]


def export_status(ckpt: Path, meta: dict[str, Any]) -> str:
    """'ok' when every file predict needs exists and matches the checkpoint, else why not (one line)."""
    net, seg = onnx_paths(ckpt)
    spec = meta["spec"]
    needed = [net, seg, *([rgb_path(net)] if split_export(spec) else [])] if spec["seg_channels"] else [net]
    missing = [p.name for p in [*needed, stamp_path(net)] if not p.is_file()]
    if missing:
        return f"no ONNX export beside {ckpt} ({', '.join(missing)} missing; run `geoloc export {ckpt}`)"
    try:
        stamp = json.loads(stamp_path(net).read_text()).get(FINGERPRINT_KEY)
    except (OSError, ValueError, AttributeError):
        stamp = None
    if stamp != fingerprint(ckpt):
        return f"{net} was exported from a different checkpoint than {ckpt}: run `geoloc export {ckpt}`"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return NO_ONNXRUNTIME
    return "ok"


NO_ONNXRUNTIME = f"onnxruntime is not installed ({install_hint('predict')})"


META_KEY = "geoloc"  # the export's description in model.onnx's metadata and in model.onnx.json


def export_description(meta: dict[str, Any]) -> dict[str, Any]:
    """What a user of the ONNX files needs besides them, from the checkpoint's metadata: the spec, the
    photo's preprocessing, the cells (centres and the hierarchy), the segmenter's preprocessing and the
    palette that turns its class map into the network's seg input."""
    from geoloc_cli.model.segmentation import load_palette

    out = {"spec": meta["spec"], "preprocess": meta["preprocess"], "partitionings": meta["partitionings"],
           "protocol": meta.get("protocol", {}), "hierarchical": HIERARCHICAL_RULE}
    if meta["spec"]["seg_channels"]:
        out["segmenter"] = {"preprocess": meta["segmenter"]["preprocess"], "palette": load_palette().tolist()}
    return out


HIERARCHICAL_RULE = ("p(c) = p_finest(c) * prod over coarser partitionings of p_coarser(parents[coarser][c]) "
                     "(a -1 parent contributes 1); the prediction is the finest cell c with the largest p(c), "
                     "placed at cells[finest].lat/lon[c]")


def read_export(path: Path) -> tuple[Path, dict[str, Any], str]:
    """(network file, description, fingerprint) of an export given as its .onnx file or its folder."""
    net = Path(path) / "model.onnx" if Path(path).is_dir() else Path(path)
    try:
        stamp = json.loads(stamp_path(net).read_text())
        return net, stamp[META_KEY], stamp[FINGERPRINT_KEY]
    except (OSError, ValueError, KeyError):
        raise InputError(f"{path}: not a geoloc ONNX export ({stamp_path(net).name} beside it is missing or "
                         "predates self-describing exports: run `geoloc export CKPT` again)") from None


class OnnxModel:
    """The exported network (+ segmenter) of one checkpoint: photos in, probabilities per head out."""

    name = "onnx"

    @classmethod
    def of_checkpoint(cls, ckpt: Path, meta: dict[str, Any]) -> OnnxModel:
        return cls(onnx_paths(ckpt)[0], meta, fingerprint(ckpt))

    @classmethod
    def of_export(cls, path: Path) -> OnnxModel:
        return cls(*read_export(path))

    def __init__(self, net_path: Path, meta: dict[str, Any], expected: str, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.meta, self.spec = meta, meta["spec"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.log_severity_level = 3  # warnings about unused initialisers are noise here
        # Several sessions load and run at once on few cores: idle threads must sleep, not spin.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Weights in page-aligned .data files are mapped, not copied; pre-packing them would copy them
        # again (seconds for a ViT-B, more than it saves on a few photos).
        opts.add_session_config_entry("session.disable_prepacking", "1")
        # Loading the network (hundreds of MB) is the slowest step of a cold start: it runs in threads
        # (onnxruntime releases the GIL) while the segmenter loads and runs on the first photos; a split
        # export loads its two halves in parallel and runs the RGB half as soon as it is there.
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="onnx")
        self._net = self._pool.submit(self._session, ort, net_path, opts, expected)
        split = rgb_path(net_path).is_file() and self.spec["seg_channels"]
        self._rgb = self._pool.submit(self._session, ort, rgb_path(net_path), opts, expected) if split else None
        try:
            self.seg = self._session(ort, seg_path(net_path), opts, expected) if self.spec["seg_channels"] else None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let the worker threads go: a load still running ends on its own, nothing waits for it."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def net(self) -> Any:
        return self._net.result()  # re-raises a load error in the caller's thread

    @staticmethod
    def _session(ort: Any, path: Path, opts: Any, expected: str) -> Any:
        try:
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise InputError(f"cannot load {path}: {e}") from None
        stamp = sess.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY)
        if stamp != expected:
            raise InputError(f"{path} was exported from a different checkpoint: run `geoloc export` again")
        return sess

    def class_maps(self, images: list[Image.Image]) -> list[np.ndarray]:
        from geoloc_cli.inference.geolocate import segmenter_input

        assert self.seg is not None
        x = segmenter_input(images, self.meta["segmenter"]["preprocess"])
        return list(self.seg.run(None, {"pixel_values": x})[0])

    def probabilities(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """Softmax probabilities per head for a batch of RGB photos (centre crop, as evaluation)."""
        from PIL import Image

        from geoloc_cli.inference.geolocate import views
        from geoloc_cli.model.segmentation import encode_seg

        size, pre = self.spec["img_size"], self.meta["preprocess"]
        image = np.concatenate([views(im, None, size, pre)[0] for im in images])
        feed: dict[str, Any] = {}
        if self._rgb is not None:  # the RGB half runs in the background while the segmenter works
            feature = self._pool.submit(lambda: self._rgb.result().run(None, {"image": image})[0])
        else:
            feed["image"] = image
        if self.seg is not None:
            maps = self.class_maps(images)
            seg = np.concatenate([views(im, Image.fromarray(m), size, pre)[1] for im, m in zip(images, maps,
                                                                                              strict=True)])
            feed["seg"] = encode_seg(seg, self.spec["seg_channels"])
        if self._rgb is not None:
            feed["rgb_feature"] = feature.result()
        heads = [o.name for o in self.net.get_outputs()]
        return dict(zip(heads, self.net.run(None, feed), strict=True))
