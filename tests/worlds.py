"""Tiny demo worlds for the tests: configs/demo.yaml scaled down (200 photos, a one-block ViT at 32 px),
run through the first stages of the pipeline once per test module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from geoloc_cli.cli import app

DEMO_CFG = Path(__file__).parents[1] / "configs" / "demo.yaml"
TINY_VIT = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
DATA_STAGES = (["fetch", "demo"], ["partition", "--cells", "all"], ["filter"])


def tiny_config(root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The demo config at test size under `root`; `sections` update its sections (train={...})."""
    cfg = yaml.safe_load(DEMO_CFG.read_text())
    cfg["paths"]["root"] = str(root)
    cfg["fetch"].update(demo_size=200, shard_size=40, processes=1)
    cfg["partition"].update(tau_min=2, tau_max={"coarse": 40, "middle": 20, "fine": 10})
    cfg["segment"].update(input_size=64)
    cfg["model"].update(img_size=32, overrides=dict(TINY_VIT))
    cfg["runtime"]["num_workers"] = 0
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def build_world(tmp: Path, stages: tuple[list[str], ...] = DATA_STAGES,
                **sections: dict[str, Any]) -> tuple[Path, Path]:
    """Write the config to tmp/geoloc.yaml, run `stages` through the CLI; returns (config file, data root)."""
    path = tmp / "geoloc.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp / "data", **sections)))
    for cmd in stages:
        r = CliRunner().invoke(app, [*cmd, "-c", str(path), "-q"])
        assert r.exit_code == 0, f"geoloc {' '.join(cmd)} failed:\n{r.output}"
    return path, tmp / "data"


def free_port() -> int:
    """A TCP port nobody listens on now: parallel test runs (other checkouts too) never share one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weight_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest absolute difference between two runs' weights (train results' "params"/"ema":
    name -> numpy array), the same names in both."""
    import numpy as np

    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max(initial=0.0))
               for k in a)
