"""Strict config loading, the DinoBloom spelling, the shipped recipes and the scaling rules."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dinov2 import distributed
from dinov2.configs import (
    TRAIN_CONFIG_DIR,
    ConfigError,
    apply_scaling_rules_to_cfg,
    config_differences,
    flat_config,
    load_config,
    resolve_arch,
    write_config,
)

CUSTOM = TRAIN_CONFIG_DIR / "custom.yaml"
SIZE_CONFIGS = {"vits14": "dinov2_vits14", "vitb14": "dinov2_vitb14", "vitl14": "dinov2_vitl14", "vitg14": "dinov2_vitg14"}


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_dinov2s() -> None:
    cfg = load_config(None)
    # DINOv2's ssl_default_config.yaml values.
    assert cfg.optim.base_lr == 0.004
    assert cfg.optim.layerwise_decay == 0.9
    assert cfg.teacher.momentum_teacher == 0.992
    assert cfg.crops.local_crops_number == 8 and cfg.crops.local_crops_size == 96
    assert cfg.student.arch == "vit_large" and cfg.student.patch_size == 16
    assert cfg.train.centering == "centering" and cfg.ibot.separate_head is False
    assert cfg.compute_precision.student.dino_head.mixed_precision.reduce_dtype == "fp32"


def test_file_then_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "optim:\n  base_lr: 1.0e-3\ntrain:\n  batch_size_per_gpu: 32\n")
    cfg = load_config(path, ["optim.base_lr=5e-4", "crops.local_crops_number=2"])
    assert cfg.optim.base_lr == 5e-4  # the command line wins over the file
    assert cfg.train.batch_size_per_gpu == 32  # the file wins over the defaults
    assert cfg.crops.local_crops_number == 2
    assert cfg.optim.epochs == 100  # untouched default


def test_typo_names_the_closest_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "optim:\n  base_lrr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.base_lrr'; did you mean optim.base_lr\?") as err:
        load_config(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match=r"'train.batch_size'; did you mean train.batch_size_per_gpu\?"):
        load_config(None, ["train.batch_size=3"])


def test_every_unknown_key_is_reported_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "optimizer:\n  base_lr: 1.0\ncrops:\n  global_crop_size: 98\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "'optimizer.base_lr'; did you mean optim.base_lr?" in str(err.value)
    assert "'crops.global_crop_size'; did you mean crops.global_crops_size?" in str(err.value)


@pytest.mark.parametrize(
    ("override", "meant"),
    [("train.patch_size=14", "student.patch_size"), ("dino.separate_head=true", "ibot.separate_head"),
     ("train.arch=vit_base", "student.arch"), ("teacher.base_lr=1.0", "optim.base_lr"),
     ("model.weights=run/checkpoints/000000009", "MODEL.WEIGHTS"), ("Train.Seed=1", "train.seed"),
     ("optim.epoch_length=5", "train.OFFICIAL_EPOCH_LENGTH")],
)
def test_misplaced_key_points_to_its_section(override: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=rf"did you mean {meant}\?"):
        load_config(None, [override])


def test_types_are_checked_and_numbers_coerced() -> None:
    with pytest.raises(ConfigError, match=r"optim.base_lr must be a number, got 'abc'"):
        load_config(None, ["optim.base_lr=abc"])
    with pytest.raises(ConfigError, match=r"train.batch_size_per_gpu must be an integer, got 1.5"):
        load_config(None, ["train.batch_size_per_gpu=1.5"])
    with pytest.raises(ConfigError, match=r"ibot.separate_head must be true or false"):
        load_config(None, ["ibot.separate_head=3"])
    with pytest.raises(ConfigError, match=r"crops.global_crops_scale\[1\] must be a number"):
        load_config(None, ["crops.global_crops_scale=[0.3,big]"])
    with pytest.raises(ConfigError, match=r"train is a section"):
        load_config(None, ["train=3"])
    with pytest.raises(ConfigError, match=r"crops is a section .* got None"):  # was ignored, unsaid
        load_config(None, ["crops=null"])
    # a dot missing before a setting: an error even when a later override of the section would hide it in a merge
    for overrides in (["train=dataset_path=/my/data", "train.output_dir=out"],
                      ["train.batch_size_per_gpu=2", "train=dataset_path=/my/data", "train.output_dir=out"]):
        with pytest.raises(ConfigError, match=r"train is a section .* got 'dataset_path=/my/data'; for one of its "
                                              r"settings write train\.dataset_path=/my/data$"):
            load_config(None, overrides)
    with pytest.raises(ConfigError, match=r"student is a section .* got 'vit_base'$"):
        load_config(None, ["student=vit_base", "student.depth=2"])
    with pytest.raises(ConfigError, match=r"train is a section .* got '\$\{evaluation\}'$"):  # as written
        load_config(None, ["train=${evaluation}", "train.seed=1"])
    cfg = load_config(None, ["optim.base_lr=1", "train.output_dir=2024"])
    assert isinstance(cfg.optim.base_lr, float) and cfg.optim.base_lr == 1.0
    assert cfg.train.output_dir == "2024"
    # an empty value (`key=` in the shell, which OmegaConf reads as null) empties a string setting
    cfg = load_config(None, ["evaluation.knn_data=", "student.pretrained_weights="])
    assert cfg.evaluation.knn_data == "" and cfg.student.pretrained_weights == ""
    with pytest.raises(ConfigError, match=r"optim.base_lr must be a number, got None"):
        load_config(None, ["optim.base_lr="])
    with pytest.raises(ConfigError, match=r"train.output_dir is empty"):  # never the current directory by accident
        load_config(None, ["train.output_dir="])
    with pytest.raises(ConfigError, match=r"crops.blur_probabilities=\[True, False, 0.5\] must be null or 3"):
        load_config(None, ["crops.blur_probabilities=[true,false,0.5]"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.centering=mean", r"train.centering='mean' is not one of centering, sinkhorn_knopp"),
        ("train.precision=fp8", r"train.precision='fp8' is not one of auto, fp32, bf16, fp16"),
        ("train.colour_augmentation=gpu", r"train.colour_augmentation='gpu' is not one of auto, workers, device"),
        ("compute_precision.student.backbone.sharding_strategy=HYBRID", r"sharding_strategy='HYBRID'"),
        ("compute_precision.student.backbone.mixed_precision.buffer_dtype=fp16", r"buffer_dtype must be fp32"),
        ("compute_precision.teacher.dino_head.sharding_strategy=NO_SHARD", r"must both be NO_SHARD or both"),
        ("ibot.mask_ratio_min_max=[0.5,0.1]", r"ibot.mask_ratio_min_max=\[0.5, 0.1\] must be \[low, high\]"),
        ("crops.local_crops_scale=[0.0,0.32]", r"crops.local_crops_scale=\[0.0, 0.32\] must be \[low, high\] with 0 < low"),
        ("student.num_register_tokens=-1", r"student.num_register_tokens must be >= 0, got -1"),
        ("optim.warmup_epochs=200", r"optim.warmup_epochs=200 must lie in \[0, optim.epochs=100\]"),
        ("crops.global_crops_size=100", r"crops.global_crops_size=100 is not a multiple of the patch size 16"),
        ("train.batch_size_per_gpu=0", r"train.batch_size_per_gpu must be positive"),
        ("train.num_workers=-1", r"train.num_workers must be >= 0, got -1"),
        ("train.seed=-1", r"train.seed must be >= 0, got -1"),
        ("crops.local_crops_number=-2", r"crops.local_crops_number must be >= 0, got -2"),
        ("optim.clip_grad=-3", r"optim.clip_grad must be >= 0, got -3"),
        ("ibot.mask_sample_probability=1.5", r"ibot.mask_sample_probability=1.5 must lie in \[0, 1\]"),
        ("train.max_bad_image_fraction=2", r"train.max_bad_image_fraction=2.0 must lie in \[0, 1\]"),
        ("train.data_timeout_s=-1", r"train.data_timeout_s must be >= 0, got -1.0"),
        ("evaluation.rankme_batches=0", r"evaluation.rankme_batches=0 must lie in \[1, rankme_period_iterations\]"),
        ("evaluation.rankme_batches=2000", r"evaluation.rankme_batches=2000 must lie in \[1, rankme_period_"),
        ("evaluation.rankme_period_iterations=-1", r"evaluation.rankme_period_iterations=-1 must be >= 0"),
        # values that trained silently the wrong way (gradient ascent, an EMA beyond the student) or crashed later
        ("optim.min_lr=-1e-3", r"optim.min_lr must be >= 0, got -0.001"),
        ("optim.base_lr=0", r"optim.base_lr must be positive, got 0"),
        ("optim.weight_decay_end=-1", r"optim.weight_decay_end must be >= 0"),
        ("optim.patch_embed_lr_mult=-1", r"optim.patch_embed_lr_mult must be >= 0"),
        ("optim.layerwise_decay=0", r"optim.layerwise_decay=0.0 must lie in \(0, 1\]"),
        ("optim.adamw_beta1=1.5", r"optim.adamw_beta1=1.5 must lie in \[0, 1\)"),
        ("teacher.momentum_teacher=1.5", r"teacher.momentum_teacher=1.5 must lie in \[0, 1\]"),
        ("teacher.teacher_temp=0", r"teacher.teacher_temp must be positive"),
        ("student.drop_path_rate=2", r"student.drop_path_rate=2.0 must lie in \[0, 1\)"),
        ("student.patch_size=0", r"student.patch_size must be positive"),
        ("crops.local_crops_size=0", r"crops.local_crops_size must be positive"),
        ("dino.head_n_prototypes=0", r"dino.head_n_prototypes must be positive"),
        ("dino.head_nlayers=0", r"dino.head_nlayers must be positive"),
    ],
)
def test_values_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_the_ibot_head_sizes_are_checked_only_where_there_is_an_ibot_head() -> None:
    load_config(None, ["ibot.separate_head=false", "ibot.head_nlayers=0"])  # iBOT shares DINO's head: unused
    with pytest.raises(ConfigError, match=r"ibot.head_nlayers must be positive"):
        load_config(None, ["ibot.separate_head=true", "ibot.head_nlayers=0"])


def test_bad_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"is a folder; name a .yaml file in it"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"'optim.base_lr' is not of the form key=value$"):
        load_config(None, ["optim.base_lr"])
    # `key value`, as other tools spell it: the fix is offered (not for a key followed by an override)
    with pytest.raises(ConfigError, match=r"'optim.base_lr' is not of the form key=value; did you mean "
                                          r"optim.base_lr=1e-3\?$"):  # fmt: skip
        load_config(None, ["train.seed=1", "optim.base_lr", "1e-3"])
    with pytest.raises(ConfigError, match=r"'optim.base_lr' is not of the form key=value$"):
        load_config(None, ["optim.base_lr", "train.seed=1"])
    with pytest.raises(ConfigError, match=r"cannot parse the YAML") as raised:
        load_config(_write(tmp_path, "train: [unclosed\t# a tab, not in an indentation\n"))
    assert "tabs" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"(?s)cannot parse the YAML: .*; YAML indents with spaces, not tabs$"):
        load_config(_write(tmp_path, "optim:\n\tbase_lr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"override 'crops.blur_probabilities=\[0.9,0.9' cannot be parsed: while"):
        load_config(None, ["train.seed=1", "crops.blur_probabilities=[0.9,0.9"])


def test_text_settings_keep_the_command_lines_spelling() -> None:
    """YAML reads `0123` as the octal 83, `12:30` as 750 (base 60) and `1e3` as 1000.0; a folder or a name keeps
    what was typed. Number settings still read numbers."""
    cfg = load_config(None, ["train.output_dir=0123", "tracking.wandb_name=12:30", "MODEL.WEIGHTS=1e3",
                             "train.batch_size_per_gpu=12"])  # fmt: skip
    assert (cfg.train.output_dir, cfg.tracking.wandb_name, cfg.MODEL.WEIGHTS) == ("0123", "12:30", "1e3")
    assert cfg.train.batch_size_per_gpu == 12
    # YAML's truth words too, and a key given twice takes its last spelling, as its value
    cfg = load_config(None, ["train.output_dir=no", "tracking.wandb_name=foo", "tracking.wandb_name=0123"])
    assert (cfg.train.output_dir, cfg.tracking.wandb_name) == ("no", "0123")
    # ' #' starts a YAML comment: a folder "runs #2" would have been "runs", maybe another run's, resumed unsaid
    cfg = load_config(None, ["train.output_dir=runs #2", "tracking.wandb_name=lr 1e-3 #2", "MODEL.WEIGHTS='a #b'"])
    assert (cfg.train.output_dir, cfg.tracking.wandb_name, cfg.MODEL.WEIGHTS) == ("runs #2", "lr 1e-3 #2", "a #b")
    for override in ("train.batch_size_per_gpu=12 #per GPU", "train.compile=true #x", "optim.base_lr=4e-3 #x",
                     "crops.global_crops_scale=[0.3,1.0] #x", "train.output_dir='a' #x"):
        with pytest.raises(ConfigError, match=r"YAML reads '#' after a space as the start of a comment"):
            load_config(None, [override])
    assert load_config(None, ["train.output_dir=#2"]).train.output_dir == "#2"


def test_a_text_setting_written_as_a_number_in_a_file_must_be_quoted(tmp_path: Path) -> None:
    """A file's spelling is gone once YAML has read it (`0123` is 83): the run would use another folder unsaid."""
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  output_dir: 0123\n")
    with pytest.raises(ConfigError, match=r"train.output_dir must be a string, got the number 83: quote it in the YAML"):
        load_config(config)
    config.write_text("train:\n  output_dir: '0123'\n")
    assert load_config(config).train.output_dir == "0123"


def test_hydra_spellings_and_derived_settings_get_the_right_advice() -> None:
    """`+key=`/`~key` (Hydra's) were taken for misspelt keys; a guess of a derived setting (`optim.lr`, which
    scaling replaces) pointed at one that has no effect."""
    for item in ("+train.newkey=1", "~train.seed"):
        with pytest.raises(ConfigError, match=r"\+key and ~key \(Hydra's\) are not supported here"):
            load_config(None, [item])
    with pytest.raises(ConfigError, match=r"unknown key 'train.lr'; did you mean optim.base_lr\?"):
        load_config(None, ["train.lr=0.1"])


@pytest.mark.parametrize(("override", "message"), [
    ("optim.base_lr=.nan", "optim.base_lr must be a finite number, got nan"),
    ("teacher.teacher_temp=.inf", "teacher.teacher_temp must be a finite number, got inf"),
    ("train.data_timeout_s=.inf", "train.data_timeout_s must be a finite number, got inf; 0 waits for ever"),
])
def test_numbers_that_are_not_finite_are_refused(override: str, message: str) -> None:
    """NaN passes every range check (each comparison with it is false), and the run then fails far from the cause."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_interpolations_resolve_at_load_or_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_ROOT", "/scratch/cells")
    cfg = load_config(
        None, ["train.dataset_path=${oc.env:DATA_ROOT}/lists", "train.output_dir=${train.dataset_path}/run"]
    )
    assert cfg.train.output_dir == "/scratch/cells/lists/run"
    # DinoBloom's released config wrote ${SLURM_TMPDIR}, which OmegaConf reads as another setting
    with pytest.raises(ConfigError, match=r"train.dataset_path: Interpolation key 'SLURM_TMPDIR' not found .*oc.env"):
        load_config(None, ["train.dataset_path=${SLURM_TMPDIR}/shards"])


def test_original_dinobloom_spelling_is_accepted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The layout of DinoBloom's released custom.yaml: architecture keys under train:, a hub arch name, the
    # dataset string, the switched-off smooth-rank loss, the top-level choice of augmentation class.
    original = (
        "ibot:\n  separate_head: true\n"
        'data_transform: "default"\n'
        "train:\n  batch_size_per_gpu: 120\n  OFFICIAL_EPOCH_LENGTH: 500\n"
        "  dataset_path: HemaStandardDataset:root=/data/lists:shuffle=1\n  centering: sinkhorn_knopp\n"
        "  drop_path_rate: 0.4\n  ffn_layer: swiglufused\n  block_chunks: 0\n  num_register_tokens: 0\n"
        "student:\n  arch: dinov2_vitb14\n  patch_size: 14\n"
        "crops:\n  local_crops_size: 98\n  local_crops_number: 1\n"
        "dino:\n  head_bottleneck_dim: 256\n  smooth_rank_loss_weight: 0.0\n"
    )
    with caplog.at_level(logging.WARNING):
        cfg = load_config(_write(tmp_path, original))
    for key in ("train.ffn_layer", "train.block_chunks", "train.num_register_tokens", "train.drop_path_rate",
                "dino.smooth_rank_loss_weight"):
        assert any(key in record.getMessage() and "ignored" in record.getMessage() for record in caplog.records), key
    assert "ffn_layer" not in cfg.train and "smooth_rank_loss_weight" not in cfg.dino
    assert cfg.train.dataset_path == "HemaStandardDataset:root=/data/lists:shuffle=1"
    assert "data_transform" not in cfg and cfg.train.augmentation == "hematology"  # DinoBloom's "default" class
    arch = resolve_arch(cfg)
    # What torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14") builds: the train: keys had no effect.
    assert (arch.name, arch.hub_name, arch.embed_dim, arch.patch_size) == ("vit_base", "dinov2_vitb14", 768, 14)
    assert arch.kwargs["ffn_layer"] == "mlp" and arch.kwargs["drop_path_rate"] == 0.0
    assert arch.kwargs["init_values"] == 1.0 and arch.kwargs["img_size"] == 224
    with pytest.raises(ConfigError, match=r"dino.smooth_rank_loss_weight=0.5 is not supported"):
        load_config(None, ["dino.smooth_rank_loss_weight=0.5"])
    with pytest.raises(ConfigError, match=r"data_transform='hema' is not supported: .*'hema' class is not implemented"):
        load_config(None, ["data_transform=hema"])
    with pytest.raises(ConfigError, match=r"data_transform='default' .* contradicts train.augmentation='dinov2'"):
        load_config(None, ["data_transform=default", "train.augmentation=dinov2"])


def test_hub_architecture_overrides_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        arch = resolve_arch(load_config(CUSTOM, ["student.drop_path_rate=0.2", "student.ffn_layer=swiglufused"]))
    assert arch.kwargs["drop_path_rate"] == 0.0 and arch.kwargs["ffn_layer"] == "mlp"
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "student.drop_path_rate=0.2 is ignored" in messages and "student.ffn_layer='swiglufused' is ignored" in messages
    reg = resolve_arch(load_config(CUSTOM, ["student.arch=dinov2_vits14_reg"]))
    assert reg.kwargs["num_register_tokens"] == 4 and reg.kwargs["interpolate_offset"] == 0.0
    assert reg.embed_dim == 384


def test_resolve_arch_errors() -> None:
    with pytest.raises(ConfigError, match=r"student.patch_size=16 contradicts student.arch=dinov2_vitb14"):
        load_config(CUSTOM, ["student.patch_size=16"])
    with pytest.raises(ConfigError, match=r"cannot change the size of the hub architecture dinov2_vitb14"):
        load_config(CUSTOM, ["student.embed_dim=96"])
    with pytest.raises(ConfigError, match=r"student.arch='vit_tiny' is unknown"):
        load_config(None, ["student.arch=vit_tiny"])
    with pytest.raises(ConfigError, match=r"student.arch='dinov2_vitx14' is not a DINOv2 hub model"):
        load_config(None, ["student.arch=dinov2_vitx14"])
    with pytest.raises(ConfigError, match=r"embed_dim=100 is not divisible by student.num_heads=6"):
        load_config(None, ["student.arch=vit_small", "student.embed_dim=100"])
    with pytest.raises(ConfigError, match=r"crops.local_crops_size=96 is not a multiple of the patch size 14"):
        load_config(None, ["student.patch_size=14"])


def test_custom_size_from_architecture() -> None:
    cfg = load_config(None, ["student.arch=vit_small", "student.embed_dim=96", "student.depth=4", "student.num_heads=3"])
    kwargs = resolve_arch(cfg).kwargs
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], kwargs["patch_size"]) == (96, 4, 3, 16)
    assert kwargs["drop_path_rate"] == 0.3 and kwargs["init_values"] == 1e-5  # student.* apply to non-hub names


def test_custom_yaml_matches_the_resolved_dinobloom_config(conformance_dir: Path) -> None:
    """Every value of the manifest's resolved_training_config (the original custom.yaml over DINOv2's defaults)."""
    resolved = json.loads((conformance_dir / "manifest.json").read_text())["resolved_training_config"]
    expected = {}
    for key, value in resolved.items():
        if key in ("source", "notes"):
            continue
        if key == "student.arch_in_custom_yaml":
            expected["student.arch"] = value
        elif key == "heads":
            expected.update({f"{head}.{name}": v for head, fields in value.items() for name, v in fields.items()})
        elif isinstance(value, dict):
            expected.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            expected[key] = value
    assert len(expected) >= 25  # the manifest's whole content, not a silently empty comparison
    flat = flat_config(load_config(CUSTOM))
    mismatches = {key: (flat.get(key, "<missing>"), want) for key, want in expected.items() if flat.get(key) != want}
    assert not mismatches


def test_custom_yaml_has_the_design_numbers() -> None:
    """design.md's "Numbers that matter". Not compared: train.num_workers (a machine setting; the original used 124)
    and train.dataset_path (a path on the original cluster)."""
    cfg = load_config(CUSTOM)
    design = {
        "student.arch": "dinov2_vitb14", "crops.global_crops_size": 224, "student.patch_size": 14,
        "train.batch_size_per_gpu": 120, "optim.base_lr": 2e-4, "optim.scaling_rule": "sqrt_wrt_1024",
        "optim.warmup_epochs": 20, "train.OFFICIAL_EPOCH_LENGTH": 500, "optim.epochs": 200,
        "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.2, "teacher.momentum_teacher": 0.994,
        "teacher.final_momentum_teacher": 1.0, "teacher.warmup_teacher_temp": 0.04, "teacher.teacher_temp": 0.07,
        "teacher.warmup_teacher_temp_epochs": 30, "crops.global_crops_scale": [0.32, 1.0],
        "crops.local_crops_size": 98, "dino.koleo_loss_weight": 0.1, "train.centering": "sinkhorn_knopp",
        "ibot.separate_head": True, "dino.head_n_prototypes": 65536, "dino.head_bottleneck_dim": 256,
        "dino.head_hidden_dim": 2048, "dino.head_nlayers": 3, "optim.clip_grad": 3.0,
        "optim.patch_embed_lr_mult": 0.2, "optim.layerwise_decay": 1.0, "compute_precision.grad_scaler": True,
        "compute_precision.student.backbone.mixed_precision.param_dtype": "fp16",
        "train.augmentation": "hematology", "train.precision": "auto",
    }
    flat = flat_config(cfg)
    assert {k: flat[k] for k in design} == design
    assert cfg.student.pretrained_weights.endswith("dinov2_vitb14_pretrain.pth")
    lr = apply_scaling_rules_to_cfg(cfg, world_size=8).optim.lr
    assert lr == pytest.approx(2e-4 * math.sqrt(8 * 120 / 1024))


@pytest.mark.parametrize("name", sorted(SIZE_CONFIGS))
def test_size_configs_are_the_same_recipe(name: str) -> None:
    custom = flat_config(load_config(CUSTOM))
    sized_cfg = load_config(TRAIN_CONFIG_DIR / f"{name}.yaml")
    sized = flat_config(sized_cfg)
    per_size = {"student.arch", "train.batch_size_per_gpu", "student.pretrained_weights", "student.ffn_layer"}
    per_size |= {key for key in custom if key.startswith("compute_precision.") and key.endswith("sharding_strategy")}
    assert {k: v for k, v in sized.items() if k not in per_size} == {k: v for k, v in custom.items() if k not in per_size}
    assert sized["student.arch"] == SIZE_CONFIGS[name]
    assert SIZE_CONFIGS[name].split("_")[1] in sized["student.pretrained_weights"]
    arch = resolve_arch(sized_cfg)
    if name == "vitg14":
        assert arch.embed_dim == 1536 and arch.kwargs["ffn_layer"] == "swiglufused"
        strategies = {v for k, v in sized.items() if k.endswith("sharding_strategy")}
        assert strategies == {"FULL_SHARD"}
    else:
        assert arch.kwargs["ffn_layer"] == "mlp"


def test_demo_config_is_tiny_and_consistent() -> None:
    cfg = load_config(TRAIN_CONFIG_DIR / "demo.yaml")
    arch = resolve_arch(cfg)
    assert arch.hub_name is None and arch.embed_dim <= 192 and arch.kwargs["depth"] <= 4
    assert cfg.crops.global_crops_size % arch.patch_size == 0
    assert cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH <= 500
    assert cfg.train.precision == "fp32" and cfg.student.pretrained_weights == ""
    assert cfg.train.dataset_path == "demo_data/lists"


def test_scaling_rules() -> None:
    cfg = load_config(None, ["train.batch_size_per_gpu=32", "optim.base_lr=1e-3"])
    assert apply_scaling_rules_to_cfg(cfg, 2).optim.lr == pytest.approx(1e-3 * math.sqrt(64 / 1024))
    cfg = load_config(None, ["train.batch_size_per_gpu=32", "optim.base_lr=1e-3", "optim.scaling_rule=linear_wrt_256"])
    assert apply_scaling_rules_to_cfg(cfg, 4).optim.lr == pytest.approx(1e-3 * 128 / 256)
    cfg.optim.scaling_rule = "cubic"
    with pytest.raises(ConfigError, match=r"optim.scaling_rule='cubic'"):
        apply_scaling_rules_to_cfg(cfg, 1)


def test_schedules_that_are_rarely_meant_are_warned_about(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valid, but seldom what was meant; the shipped configs warn of none of them."""
    for name in ("custom.yaml", "demo.yaml"):
        with caplog.at_level(logging.WARNING, logger="dinov2.configs"):
            apply_scaling_rules_to_cfg(load_config(TRAIN_CONFIG_DIR / name), 1)
        assert not caplog.records, name
    cfg = load_config(None, ["optim.epochs=20", "optim.min_lr=1.0", "optim.freeze_last_layer_epochs=20",
                             "teacher.warmup_teacher_temp_epochs=500"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dinov2.configs"):
        apply_scaling_rules_to_cfg(cfg, 1)
    assert "optim.min_lr=1 is above the learning rate" in caplog.text
    assert "optim.freeze_last_layer_epochs=20 is not shorter than the run's optim.epochs=20" in caplog.text
    assert "teacher.warmup_teacher_temp_epochs=500 is not shorter" in caplog.text
    assert "optim.warmup_epochs" not in caplog.text
    # every rank has the config: rank 0 alone says it, not once per rank
    caplog.clear()
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    with caplog.at_level(logging.WARNING, logger="dinov2.configs"):
        apply_scaling_rules_to_cfg(cfg, 1)
    assert not caplog.records


def test_an_optim_lr_that_scaling_replaces_is_named(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, ["train.batch_size_per_gpu=64", "optim.base_lr=1e-3", "optim.lr=0.01"])
    with caplog.at_level(logging.WARNING, logger="dinov2.configs"):
        apply_scaling_rules_to_cfg(cfg, 1)
    assert "optim.lr=0.01 is ignored" in caplog.text and "set optim.base_lr" in caplog.text
    assert cfg.optim.lr == pytest.approx(1e-3 * math.sqrt(64 / 1024))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2.configs"):  # a run's own config.yaml, read back
        apply_scaling_rules_to_cfg(cfg, 1)
    assert "ignored" not in caplog.text


def test_config_differences_name_each_changed_key() -> None:
    before = load_config(None)
    after = load_config(None, ["optim.base_lr=1e-3", "crops.global_crops_scale=[0.4,1.0]"])
    assert config_differences(before, before) == []
    assert config_differences(before, after) == [
        "crops.global_crops_scale: [0.32, 1.0] -> [0.4, 1.0]",
        f"optim.base_lr: {before.optim.base_lr} -> 0.001",
    ]
    assert config_differences(before, after, ignore=("optim.base_lr",)) == [
        "crops.global_crops_scale: [0.32, 1.0] -> [0.4, 1.0]"
    ]
    older = OmegaConf.create({"train": {"retired_key": 1}})
    assert config_differences(older, OmegaConf.create({})) == ["train.retired_key: 1 -> (absent)"]


def test_write_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(CUSTOM, ["train.output_dir=${oc.env:HOME}/runs"])
    path = write_config(cfg, tmp_path / "out")
    assert path == tmp_path / "out" / "config.yaml"
    text = path.read_text()
    assert "${" not in text  # resolved
    assert load_config(path) == OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def test_a_hub_architecture_names_each_ignored_setting_once(caplog: pytest.LogCaptureFixture) -> None:
    """The architecture is resolved several times per run (config check, model, initial weights): one warning per
    loaded config, also for a second run in the same process (a notebook)."""
    overrides = ["student.arch=dinov2_vits14", "student.drop_path_rate=0.123", "student.patch_size=14",
                 "crops.global_crops_size=56", "crops.local_crops_size=28"]  # fmt: skip
    message = "student.drop_path_rate=0.123 is ignored: student.arch=dinov2_vits14"
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        cfg = load_config(None, overrides)
        resolve_arch(cfg)
        resolve_arch(cfg)
    assert caplog.text.count(message) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        load_config(None, overrides)
    assert caplog.text.count(message) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2"):  # a launcher's check, or the run config of an export
        load_config(None, overrides, resolve=False)
    assert message not in caplog.text
