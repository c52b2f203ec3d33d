"""params.yaml: typed validation, dotted overrides and profiles (the GPU profile ships in params.yaml)."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from training.config import Params, flatten, load_params, resolve
from training.errors import ConfigError

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_repo_params_default_to_the_cpu_profile() -> None:
    p = load_params(PARAMS)
    assert p.profile == "cpu"
    assert p.model.name == "convnext_custom" and p.data.image_size == 64


def test_gpu_profile_merges_over_the_file() -> None:
    cpu, gpu = load_params(PARAMS), load_params(PARAMS, ["profile=gpu"])
    assert gpu.profile == "gpu"
    assert gpu.data.image_size == 128 and gpu.synth.image_size == 128
    assert gpu.model.name.startswith("convnext_") and gpu.model.name != "convnext_custom"
    assert gpu.ensemble.members == 5 and gpu.split.max_per_class >= 100_000
    # sections the profile does not mention keep the file's values
    assert gpu.data.channels == cpu.data.channels and gpu.registry == cpu.registry
    assert gpu.data.augment == cpu.data.augment


def test_explicit_overrides_beat_the_profile() -> None:
    p = load_params(PARAMS, ["ensemble.members=2", "profile=gpu", "data.image_size=96"])
    assert p.ensemble.members == 2 and p.data.image_size == 96 and p.model.name != "convnext_custom"


def test_profile_chosen_in_the_file() -> None:
    raw = {"profile": "small", "profiles": {"small": {"train": {"epochs": 1}}}, "train": {"epochs": 9, "lr": 0.1}}
    p = resolve(raw)
    assert p.train.epochs == 1 and p.train.lr == 0.1
    assert resolve(raw, ["profile=cpu"]).train.epochs == 9


@pytest.mark.parametrize(("raw", "overrides", "needle"), [
    ({}, ["profile=tpu"], "profile 'tpu' is not defined"),
    ({"profiles": {"gpu": 3}}, ["profile=gpu"], "profiles.gpu: expected a mapping"),
    ({"profiles": {"gpu": {"train": {"epochs": -1}}}}, ["profile=gpu"], "train.epochs"),
    ({}, ["train.nonsense=1"], "train.nonsense"),
    ({}, ["train.epochs"], "key=value"),
    ({}, ["split.classes=[a"], "--set split.classes: cannot parse value '[a': expected ',' or ']'"),
    ({}, ["seed=-1"], "seed: Input should be greater than or equal to 0"),
    ({}, ["synth.seed=-3"], "synth.seed: Input should be greater than or equal to 0"),
    ({}, ["train.probe_epochs=10", "train.epochs=2"], "invalid params: train: train.probe_epochs=10 exceeds "
                                                      "train.epochs=2"),
])
def test_bad_profiles_and_overrides_name_the_problem(raw: dict, overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        resolve(raw, overrides)


def float_settings(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every setting typed float (or optionally float), by dotted key."""
    keys = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            keys += float_settings(kind, f"{prefix}{name}.")
        elif kind is float or (typing.get_origin(kind) in (typing.Union, types.UnionType) and float in typing.get_args(kind)):
            keys.append(prefix + name)
    return keys


def test_no_setting_takes_nan_or_infinity() -> None:
    """NaN passed every setting without a bound (``data.mean``, ``data.std``) and inf every one without an upper
    bound (``train.lr=inf``), to fail deep inside a run or, for a cut, to exclude nothing."""
    keys = float_settings()
    assert {"data.mean", "train.lr", "bins.max_novelty", "hits.fdr"} <= set(keys) and len(keys) > 50
    for key in keys:
        for value in (".nan", ".inf", "-.inf"):
            with pytest.raises(ConfigError, match=rf"{re.escape(key)}: Input should be a finite number"):
                resolve({}, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=r"synth\.timecourse_hours\.1: Input should be a finite number"):
        resolve({}, ["synth.timecourse_hours=[1, .nan]"])


def test_a_params_file_that_is_not_yaml_is_one_line_with_its_place(tmp_path) -> None:
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n  lr: [0.1\n")
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert str(err.value) == (f"{tmp_path / 'params.yaml'}: not valid YAML: expected ',' or ']', but got "
                              "'<stream end>' at line 4, column 1")
    (tmp_path / "slide.h5").write_bytes(b"\x89HDF\r\n\x1a\n\x00\x00")  # a binary file given as --params
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "slide.h5")
    assert str(err.value) == f"{tmp_path / 'slide.h5'}: not a text file (byte 0 is not UTF-8); expected params.yaml"


def test_balance_unlabeled_is_false_or_predicted() -> None:
    """`--set ssl.balance_unlabeled=...` (YAML-parsed): false and predicted pass, anything else names the key."""
    assert resolve({}, ["ssl.balance_unlabeled=predicted"]).ssl.balance_unlabeled == "predicted"
    assert resolve({}, ["ssl.balance_unlabeled=false"]).ssl.balance_unlabeled is False
    for bad in ("true", "uniform"):
        with pytest.raises(ConfigError, match=r"ssl\.balance_unlabeled"):
            resolve({}, [f"ssl.balance_unlabeled={bad}"])


def test_state_names_on_off_survive_a_yaml11_round_trip() -> None:
    """`dvc exp run -S` rewrites params.yaml with unquoted on/off keys, which PyYAML reads as booleans."""
    import yaml

    raw = yaml.safe_load("al:\n  state_classes: {on: stimulated, off: unstimulated, blocked: atg5_ko}\n")
    assert True in raw["al"]["state_classes"]
    p = resolve(raw)
    assert p.al.state_classes == {"on": "stimulated", "off": "unstimulated", "blocked": "atg5_ko"}


def test_params_yaml_and_config_defaults_do_not_drift() -> None:
    """One source of defaults: every value params.yaml lists is the config class's default, and every section of
    the config is in params.yaml (so `dvc` tracks it and a reader sees it)."""
    import yaml

    raw = yaml.safe_load(PARAMS.read_text())
    raw.pop("profiles")
    defaults = flatten(Params().model_dump(mode="json"))
    listed = flatten(Params.model_validate(raw).model_dump(mode="json"))
    drift = {k: (flatten(raw).get(k), defaults.get(k)) for k in flatten(raw) if listed.get(k) != defaults.get(k)}
    assert not drift, f"params.yaml value vs training/config.py default: {drift}"
    assert set(raw) == set(Params.model_fields)
