import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geoloc_cli.cli import app
from geoloc_cli.config import Config, describe, dump_yaml, from_dict, load_config, parse_override, to_dict
from geoloc_cli.errors import ConfigError


def test_defaults_match_published_thresholds():
    cfg = load_config()
    assert cfg.partition.tau_min == 50
    assert cfg.partition.tau_max == {"coarse": 5000, "middle": 2000, "fine": 1000}
    assert cfg.train.loss_weights == {"coarse": 0.5, "middle": 0.3, "fine": 0.2, "scene": 1.0}


def test_precedence_defaults_yaml_set_options(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.5\n  epochs: 3\npaths:\n  root: from-yaml\n")
    cfg = load_config(f, ["train.lr=0.25"], {"train.epochs": 7, "paths.root": None})
    assert cfg.train.lr == 0.25  # --set beats YAML
    assert cfg.train.epochs == 7  # explicit option beats YAML
    assert cfg.paths.root == str(tmp_path / "from-yaml")  # None option = not given; beside the file
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default


def test_default_file_is_picked_up(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "geoloc.yaml").write_text("train: {epochs: 2}\n")
    assert load_config().train.epochs == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "train.lrr: unknown key (did you mean train.lr?"),
        ("nope.x=1", "nope: unknown key"),
        ("train.lr=abc", "train.lr: expected float"),
        ("train.epochs=1.5", "train.epochs: expected int"),
        ("train.epochs=0", "train.epochs: 0 is not allowed"),
        ("model.seg_channels=7", "model.seg_channels: 7 is not allowed (expected 0, 3 or 150)"),
        ("model.fusion=early", "model.fusion: 'early' is not allowed (expected late, gated or exchange)"),
        ("filter.scene_of_interest=true", "filter.scene_of_interest: expected int (0, 1, 2 or 3), got True"),
        ("model.scene_classes='3'", "model.scene_classes: expected int (3, 16 or 365), got '3'"),
        ("model.scene_classes=365.0", "model.scene_classes: expected int (3, 16 or 365), got 365.0"),
        ("runtime.gpus=[a]", "runtime.gpus[0]: expected int"),
        ("train.augment=3", "train.augment: expected bool"),
        ("model.partitionings=[coarse,huge]", "model.partitionings"),
        ("train", "expected key.path=value"),
        ("train.loss_weights.fien=0.2", "train.loss_weights: ['fien'] name no head"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_override_parses_yaml_values():
    assert parse_override("runtime.gpus=[0,1]") == {"runtime": {"gpus": [0, 1]}}
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # int accepted for a float


def test_round_trip_and_docs():
    cfg = load_config(None, ["train.epochs=4", "model.fusion=exchange"])
    assert from_dict(to_dict(cfg)) == cfg
    assert "epochs: 4" in dump_yaml(cfg)
    rows = describe()
    assert all(d for _, _, d in rows), "every config field has a docstring"
    assert any(k == "partition.tau_min" for k, _, _ in rows)


def test_yaml_errors(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_cli_config_error_is_one_line_exit_2():
    r = CliRunner().invoke(app, ["config", "--set", "train.batch_size=big"])
    assert r.exit_code == 2
    assert "train.batch_size: expected int" in r.output
    assert "Traceback" not in r.output


def test_cli_gpus_option_is_checked():
    r = CliRunner().invoke(app, ["train", "--gpus", "0,x"])
    assert r.exit_code == 2
    assert "--gpus" in r.output


@pytest.mark.parametrize("cmd", ["fetch", "partition", "filter", "segment", "train", "evaluate", "predict"])
def test_every_command_has_help_with_example(cmd: str):
    r = CliRunner().invoke(app, [cmd, "--help"])
    assert r.exit_code == 0
    assert "Examples" in r.output
    for opt in ("--config", "--set", "--root"):
        assert opt in r.output


def test_demo_config_is_valid():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert cfg.train.dataset == "demo" and cfg.partition.tau_min == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("train:\n  lr: 1\n  lr: 2\n", "key 'lr' appears twice (line 3)"),
        ("train: {epochs: 1}\ntrain: {epochs: 2}\n", "key 'train' appears twice"),
        (b"train:\n  run: caf\xe9\n", "not UTF-8 text"),
    ],
)
def test_config_file_mistakes_are_one_line_errors(tmp_path: Path, content: str | bytes, message: str):
    f = tmp_path / "c.yaml"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = CliRunner().invoke(app, ["config", "-c", str(f)])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_config_directory_and_empty_values(tmp_path: Path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)
    for args, key in ((["--root", ""], "paths.root"), (["--set", "train.run="], "train.run"),
                      (["--set", "paths.root=' '"], "paths.root")):
        r = CliRunner().invoke(app, ["config", *args])
        assert r.exit_code == 2 and f"{key}: '" in r.output and "empty" in r.output, r.output


def test_set_values_are_parsed_by_the_fields_type():
    """A text field keeps the text as given (YAML 1.1 would read 0612 as octal 394 and 12:30 as 750);
    other fields are parsed as YAML."""
    cfg = load_config(None, ["train.run=0612", "segment.model=12:30", "train.lr=3e-4", "runtime.gpus=[0,1]",
                             "partition.tau_max.fine=500", "model.overrides.depth=2", "runtime.num_workers=3"])
    assert (cfg.train.run, cfg.segment.model) == ("0612", "12:30")
    quoted = load_config(None, ["train.val_dataset=''", 'train.run="my run"', "fetch.size_suffix= _b "])
    assert (quoted.train.val_dataset, quoted.train.run, quoted.fetch.size_suffix) == ("", "my run", "_b")
    assert cfg.train.lr == 3e-4 and cfg.runtime.gpus == [0, 1] and cfg.runtime.num_workers == 3
    assert cfg.partition.tau_max["fine"] == 500 and cfg.model.overrides == {"depth": 2}
    choices = load_config(None, ["predict.backend=onnx", "train.precision=bf16", "model.seg_channels=150"])
    assert (choices.predict.backend, choices.train.precision, choices.model.seg_channels) == ("onnx", "bf16", 150)


def test_version_and_environment_variables(tmp_path):
    from geoloc_cli import __version__

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"geoloc {__version__}"
    (tmp_path / "c.yaml").write_text("paths: {root: from-file}\ntrain: {run: from-env}\nruntime: {device: cuda}\n")
    env = {"GEOLOC_CONFIG": str(tmp_path / "c.yaml"), "GEOLOC_ROOT": str(tmp_path / "data"), "GEOLOC_DEVICE": "cpu"}
    r = CliRunner().invoke(app, ["config"], env=env)  # the variables beat the file ...
    assert r.exit_code == 0 and "run: from-env" in r.output and f"root: {tmp_path / 'data'}" in r.output
    assert "device: cpu" in r.output
    for args in (["--root", "elsewhere"], ["--set", "paths.root=elsewhere"]):  # ... and lose to the command line
        assert "root: elsewhere" in CliRunner().invoke(app, ["config", *args], env=env).output


def test_yaml_merge_keys_work_and_odd_keys_are_one_line_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {epochs: 2, lr: 0.1}\ntrain:\n  <<: *b\n  epochs: 3\n")
    from geoloc_cli.config import read_yaml

    assert read_yaml(path)["train"] == {"epochs": 3, "lr": 0.1}, "a key beside a merge overrides it"
    path.write_text("? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="unhashable key"):
        read_yaml(path)


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path: Path, monkeypatch):
    """`-c demo` (and every recipe by its name) works outside the checkout, as from an installed wheel."""
    from geoloc_cli.config import packaged_configs

    monkeypatch.chdir(tmp_path)
    names = packaged_configs()
    assert {"demo", "clip-frozen", "dinov2-finetune", "geoestimation", "translocator"} <= set(names)
    repo = Path(__file__).parents[1] / "configs"
    assert {p.name for p in repo.rglob("*.yaml")} == {p.name for p in names.values()}  # the wheel ships them all
    cfg = load_config(Path("demo"))
    assert cfg.train.dataset == "demo"
    assert cfg.paths.root == "geoloc-data/demo"  # a shipped config's root is relative to the working directory
    assert load_config(Path("clip-frozen.yaml")).train.source == "embeddings"
    r = CliRunner().invoke(app, ["config", "-c", "demp"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "config file demp does not exist" in r.output and "demo, " in r.output
    (tmp_path / "demo").write_text("train: {epochs: 2}\n")  # a file of that name wins over the shipped one
    assert load_config(Path("demo")).train.epochs == 2


def test_relative_root_in_a_config_file_is_beside_the_file(tmp_path: Path, monkeypatch):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "c.yaml").write_text("paths: {root: data}\n")
    (tmp_path / "abs.yaml").write_text(f"paths: {{root: {tmp_path / 'x'}}}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("proj/c.yaml")).paths.root == str(Path("proj/data"))
    monkeypatch.chdir(tmp_path / "proj")
    assert load_config(Path("c.yaml")).paths.root == "data"
    assert load_config(tmp_path / "proj" / "c.yaml").paths.root == str(tmp_path / "proj" / "data")
    assert load_config(tmp_path / "abs.yaml").paths.root == str(tmp_path / "x")
    # command-line and environment roots stay relative to the working directory
    assert load_config(Path("c.yaml"), ["paths.root=here"]).paths.root == "here"


def test_global_quiet_and_verbose(tmp_path: Path, monkeypatch):
    from geoloc_cli import console

    seen = {}
    monkeypatch.setattr(console, "set_quiet", lambda q: seen.__setitem__("quiet", q))
    for args, quiet in ((["-q", "config"], True), (["config"], False), (["partition", "-q", "--help"], False)):
        seen.clear()
        assert CliRunner().invoke(app, args).exit_code == 0
        assert seen.get("quiet", False) is quiet, args
    r = CliRunner().invoke(app, ["-v", "config", "--set", "train.epochs=0"])
    assert r.exit_code == 2 and "Traceback" in r.output and "train.epochs: 0 is not allowed" in r.output
    r = CliRunner().invoke(app, ["config", "--set", "train.epochs=0"])  # not verbose: one line again
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_global_quiet_reaches_the_command(tmp_path: Path):
    """`geoloc -q CMD` and `geoloc CMD -q` both turn progress bars off for the command."""
    from geoloc_cli import console

    for args in (["-q", "partition", "--root", str(tmp_path)], ["partition", "-q", "--root", str(tmp_path)]):
        console.set_quiet(False)
        CliRunner().invoke(app, args)  # fails (no metadata); what matters is the state the command ran with
        assert console._state["quiet"] is True, args
    CliRunner().invoke(app, ["partition", "--root", str(tmp_path)])
    assert console._state["quiet"] is False


@pytest.mark.parametrize(("args", "module", "extra"), [
    (["fetch", "demo"], "h11", "fetch"),
    (["evaluate", "--from-predictions", "x.csv"], "matplotlib", "plots"),
    (["partition"], "pyarrow", "data"),
    (["filter"], "pandas", "data"),
    (["train"], "timm", "train"),
    (["segment"], "transformers", "train"),
])
def test_a_missing_extra_is_named(tmp_path: Path, monkeypatch, args: list[str], module: str, extra: str):
    """Each command checks what its extra installs before starting, and the hint names that extra."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    r = CliRunner().invoke(app, [*args, "--root", str(tmp_path)])
    assert r.exit_code == 1 and "this needs" in r.output and module in r.output, r.output
    assert f"which is not installed: pip install 'geoloc[{extra}]'" in r.output
    assert not any(tmp_path.iterdir())  # nothing started
