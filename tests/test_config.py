"""Config loading: inheritance, overrides, round trip, and every error path."""

from pathlib import Path

import pytest
import yaml

from maskformer.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_are_the_original_ade20k_r50_values():
    cfg = Config()
    assert (cfg.model.num_queries, cfg.model.dec_layers, cfg.model.hidden_dim, cfg.model.dim_feedforward) == (
        100, 6, 256, 2048)
    assert (cfg.loss.mask_weight, cfg.loss.dice_weight, cfg.loss.no_object_weight) == (20.0, 1.0, 0.1)
    assert (cfg.solver.base_lr, cfg.solver.clip_grad_norm, cfg.solver.poly_power) == (1e-4, 0.01, 0.9)
    assert cfg.data.min_size_train == [int(x * 0.1 * 512) for x in range(5, 21)]


def test_base_chain_merges_mappings_deeply_and_replaces_lists(tmp_path):
    _write(tmp_path / "bases/model.yaml", {"model": {"num_classes": 19, "backbone": {"name": "resnet18"}},
                                           "data": {"min_size_train": [1, 2, 3]}})
    _write(tmp_path / "bases/solver.yaml", {"solver": {"base_lr": 0.5, "max_iter": 10}})
    _write(tmp_path / "mid.yaml", {"_base_": ["bases/model.yaml", "bases/solver.yaml"],
                                   "model": {"backbone": {"drop_path_rate": 0.3}}})
    child = _write(tmp_path / "sub/child.yaml", {"_base_": "../mid.yaml", "data": {"min_size_train": [7]},
                                                 "solver": {"max_iter": 20}})
    cfg = load_config(child)
    assert cfg.model.num_classes == 19
    assert cfg.model.backbone.name == "resnet18" and cfg.model.backbone.drop_path_rate == 0.3
    assert cfg.data.min_size_train == [7]
    assert (cfg.solver.base_lr, cfg.solver.max_iter) == (0.5, 20)
    assert cfg.source == str(child)


def test_later_bases_win_over_earlier_ones(tmp_path):
    _write(tmp_path / "a.yaml", {"model": {"num_queries": 10}})
    _write(tmp_path / "b.yaml", {"model": {"num_queries": 20}})
    cfg = load_config(_write(tmp_path / "c.yaml", {"_base_": ["a.yaml", "b.yaml"]}))
    assert cfg.model.num_queries == 20


def test_overrides_are_parsed_as_yaml():
    cfg = config_from_dict({}, ["solver.base_lr=2e-4", "data.crop_size=[256, 320]", "model.backbone.pretrained=true",
                                "output.dir=/tmp/x", "data.crop_size=null", "solver.weight_decay_bias=0"])
    assert cfg.solver.base_lr == 2e-4 and cfg.data.crop_size is None
    assert cfg.model.backbone.pretrained is True and cfg.output.dir == "/tmp/x"
    assert cfg.solver.weight_decay_bias == 0.0 and isinstance(cfg.solver.weight_decay_bias, float)
    assert parse_override("model.backbone.name=swin_tiny_patch4_window7_224") == (
        "model.backbone.name", "swin_tiny_patch4_window7_224")
    assert config_from_dict({}, ["model.backbone.pretrained=/w/r50.pth"]).model.backbone.pretrained == "/w/r50.pth"
    # YAML 1.1 reads a bare `off` as false; where "off" is a choice it means "off", elsewhere false stays an error
    assert config_from_dict({}, ["train.amp=bf16", "train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match="data.mapper"):
        config_from_dict({}, ["data.mapper=off"])


def test_partial_nested_sections_keep_their_parents_defaults():
    cfg = config_from_dict({"data": {"test": {"options": {"num_images": 4}}}}, ["data.train.options={a: 1}"])
    assert cfg.data.test.split == "val" and cfg.data.test.options == {"num_images": 4}
    assert cfg.data.train.split == "train" and cfg.data.train.options == {"a": 1}


def test_load_config_applies_overrides_after_files(tmp_path):
    path = _write(tmp_path / "c.yaml", {"model": {"num_classes": 3}})
    assert load_config(path, ["model.num_classes=5"]).model.num_classes == 5


def test_round_trip_through_yaml(tmp_path):
    cfg = config_from_dict({}, ["model.num_classes=7", "data.train.options={num_images: 5}", "test.aug.flip=false"])
    save_config(cfg, tmp_path / "out/config.yaml")
    again = load_config(tmp_path / "out/config.yaml")
    again.source = None
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("data, message", [
    ({"model": {"num_querys": 3}}, "unknown key 'model.num_querys' (did you mean 'model.num_queries'?)"),
    ({"modle": {}}, "unknown key 'modle' (did you mean 'model'?)"),
    ({"model": {"backbone": {"nmae": "x"}}}, "did you mean 'model.backbone.name'?"),
    ({"model": {"num_queries": "many"}}, "'model.num_queries': expected int, got str 'many'"),
    ({"model": {"num_queries": 1.5}}, "'model.num_queries': expected int"),
    ({"model": {"deep_supervision": 1}}, "'model.deep_supervision': expected bool"),
    ({"data": {"min_size_train": 512}}, "'data.min_size_train': expected list of int"),
    ({"data": {"min_size_train": [512, "x"]}}, "'data.min_size_train': element 1: expected int, got str 'x'"),
    ({"model": 3}, "'model' must be a mapping"),
    ({"model": {"backbone": "resnet50"}}, "'model.backbone' must be a mapping"),
])
def test_bad_keys_and_types_name_the_file_and_key(tmp_path, data, message):
    path = _write(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_errors_in_a_base_file_name_that_file(tmp_path):
    base = _write(tmp_path / "base.yaml", {"solver": {"base_lr": "fast"}})
    child = _write(tmp_path / "child.yaml", {"_base_": "base.yaml"})
    with pytest.raises(ConfigError, match="base.yaml: 'solver.base_lr': expected number"):
        load_config(child)
    assert base.exists()


@pytest.mark.parametrize("override, message", [
    ("model.num_querys=3", "override 'model.num_querys=3': unknown key 'model.num_querys'"),
    ("solver.base_lr", "expected the form section.key=value"),
    ("=3", "empty key"),
    ("solver..base_lr=3", "empty key"),
    ("data.crop_size=[1,", "not valid YAML"),
    ("train.amp=true", "'train.amp': expected string"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        config_from_dict({}, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("model.nheads=7", "model.nheads"),
    ("model.num_classes=0", "model.num_classes"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.conv_dim=100", "model.conv_dim"),
    ("model.pixel_mean=[1,2]", "model.pixel_mean"),
    ("model.pixel_std=[1,0,1]", "model.pixel_std"),
    ("model.transformer_in_feature=transformer_encoder", "model.transformer_in_feature"),
    ("model.pixel_decoder=fpm", "model.pixel_decoder"),
    ("loss.matcher=fixed", "model.num_queries"),
    ("loss.no_object_weight=0", "loss.no_object_weight"),
    ("data.crop_size=[512]", "data.crop_size"),
    ("solver.steps=[200000]", "solver.steps"),
    ("solver.base_lr=0", "solver.base_lr"),
    ("solver.grad_accum_steps=0", "solver.grad_accum_steps"),
    ("train.amp=fp8", "train.amp"),
    ("train.device=gpu", "train.device"),
    ("test.semantic_on=false", "test.semantic_on"),
    ("model.architecture=per_pixel_baseline test.panoptic_on=true", "test.panoptic_on"),
])
def test_impossible_values_fail_at_load_time(tmp_path, override, key):
    path = _write(tmp_path / "c.yaml", {})
    with pytest.raises(ConfigError) as err:
        load_config(path, override.split(" "))
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)


def test_choice_errors_suggest_the_closest_value():
    with pytest.raises(ConfigError, match="did you mean 'fpn'"):
        config_from_dict({}, ["model.pixel_decoder=fpm"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path / "broken.yaml", "model: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(_write(tmp_path / "child.yaml", {"_base_": "nope.yaml"}))
    with pytest.raises(ConfigError, match="'_base_' must be a path or a list of paths"):
        load_config(_write(tmp_path / "badbase.yaml", {"_base_": 3}))


def test_inheritance_cycles_are_reported(tmp_path):
    _write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    _write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(tmp_path / "a.yaml")


def test_yaml_tags_that_run_code_are_refused(tmp_path):
    path = _write(tmp_path / "evil.yaml", 'data:\n  min_size_train: !!python/object/apply:eval ["[1]"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    configs = [c for c in configs if "_base_" not in c.parts]
    assert configs, "no configs shipped"
    for path in configs:
        load_config(path)
