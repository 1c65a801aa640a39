"""Training configuration: strict loading (defaults, then a file, then `key=value` overrides) and helpers.

`load_config` merges, in this order, `ssl_default_config.yaml`, a run config (e.g. `train/custom.yaml`) and
dotted command-line overrides. Every key must exist in the defaults; a value must have the default's type.
Mistakes raise `ConfigError` naming the source, the dotted key and the closest valid key.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2.files import atomic_write_text

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_FILE = CONFIG_DIR / "ssl_default_config.yaml"
TRAIN_CONFIG_DIR = CONFIG_DIR / "train"

# Keys that earlier configs set without effect. They are accepted, dropped and reported. The value is where the
# setting lives now (or None).
IGNORED_KEYS: dict[str, str | None] = {
    # DinoBloom's custom.yaml placed these under train:, where neither DINOv2 nor DinoBloom read them (its hub-built
    # backbones never looked at the config either).
    "train.ffn_layer": "student.ffn_layer",
    "train.block_chunks": "student.block_chunks",
    "train.num_register_tokens": "student.num_register_tokens",
    "train.drop_path_rate": "student.drop_path_rate",
    # Present in DINOv2's defaults but never read by its trainer.
    "train.cache_dataset": None,
    "train.saveckp_freq": "train.checkpoint_period",
}
# DinoBloom's experimental smooth-rank loss; its released config switched it off ("doesnt help").
ZERO_ONLY_KEYS = ("dino.smooth_rank_loss_weight",)
# DinoBloom's top-level choice of augmentation class: its released config's "default" is our hematology recipe.
DINOBLOOM_DATA_TRANSFORMS = {"default": "hematology"}

CHOICES: dict[str, tuple[str, ...]] = {
    "train.centering": ("centering", "sinkhorn_knopp"),
    "train.augmentation": ("hematology", "dinov2"),
    "train.colour_augmentation": ("auto", "workers", "device"),
    "train.device": ("auto", "cuda", "mps", "cpu"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.compile_scope": ("blocks", "backbone"),  # dinov2.parallel.parallelize_model's compile scopes
    "student.ffn_layer": ("mlp", "swiglu", "swiglufused", "identity"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256"),
}
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
ROLES = ("student", "teacher")
PARTS = ("backbone", "dino_head", "ibot_head")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and what is wrong."""


@dataclass(frozen=True)
class ArchSpec:
    """The resolved student architecture: canonical name, hub name if any, and `DinoVisionTransformer` kwargs."""

    name: str
    hub_name: str | None
    kwargs: dict[str, Any]

    @property
    def embed_dim(self) -> int:
        """Width of the backbone (its feature dimension)."""
        return int(self.kwargs["embed_dim"])

    @property
    def patch_size(self) -> int:
        """Patch size in pixels."""
        return int(self.kwargs["patch_size"])


def default_config() -> DictConfig:
    """The defaults of every key (`ssl_default_config.yaml`)."""
    return OmegaConf.load(DEFAULT_CONFIG_FILE)


def _read_text_or_empty(path: Path) -> str:
    """The text of ``path``, or "" when it cannot be read as text."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def load_config(config_file: str | Path | None, overrides: Sequence[str] = (), resolve: bool = True) -> DictConfig:
    """Defaults, then `config_file` (if given), then dotted `key=value` overrides; strict and type-checked.

    With `resolve`, interpolations (`${oc.env:NAME}`, `${section.key}`) are resolved here and their values
    type-checked; without it they stay as written (a launcher checking a config whose environment variables only
    the job will have).
    """
    defaults = default_config()
    default_tree = OmegaConf.to_container(defaults, resolve=False)
    valid_keys = _dotted_keys(default_tree)
    layers: list[Any] = [defaults]
    if config_file is not None:
        path = Path(config_file).expanduser()
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; name a .yaml file in it")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            file_cfg = OmegaConf.load(path)
        except (OmegaConfBaseException, OSError, yaml.YAMLError) as err:
            indented_with_tab = re.search(r"^ *\t", _read_text_or_empty(path), re.MULTILINE)
            tab = "; YAML indents with spaces, not tabs" if indented_with_tab else ""
            raise ConfigError(f"{path}: cannot parse the YAML: {err}{tab}") from err
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got a list")
        layers.append(_checked_layer(file_cfg, default_tree, valid_keys, str(path)))
    if overrides:
        for position, item in enumerate(overrides):
            if item.startswith(("+", "~")):  # Hydra's spellings: add a key, delete one
                raise ConfigError(
                    f"command-line override {item!r}: +key and ~key (Hydra's) are not supported here; every setting "
                    "exists in the default config: set it with key=value, or key=null"
                )
            if "=" not in item:
                after = overrides[position + 1] if position + 1 < len(overrides) else None
                hint = f"; did you mean {item}={after}?" if after is not None and "=" not in after else ""
                raise ConfigError(f"command-line override {item!r} is not of the form key=value{hint}")
            try:
                item_cfg = OmegaConf.from_dotlist([item])
            except (OmegaConfBaseException, yaml.YAMLError) as err:
                reason = str(err).splitlines()[0]
                raise ConfigError(f"command-line override {item!r} cannot be parsed: {reason}") from None
            _check_not_a_section(item, item_cfg, default_tree)
        override_cfg = OmegaConf.from_dotlist(list(overrides))
        _keep_spelling_of_text_settings(override_cfg, overrides, default_tree)
        layers.append(_checked_layer(override_cfg, default_tree, valid_keys, "command line"))
    cfg = OmegaConf.merge(*layers)
    assert isinstance(cfg, DictConfig)
    if resolve:
        cfg = _resolved(cfg, default_tree, valid_keys)
        _check_values(cfg, warn=True)  # (the run's own config: its ignored settings are said once, here)
    else:  # values that need the job's environment are checked when the job loads the config; the others now
        _check_values(_resolved(_with_defaults_for_unresolvable(cfg, defaults), default_tree, valid_keys))
    return cfg


def _check_not_a_section(item: str, item_cfg: DictConfig, default_tree: dict) -> None:
    """Refuse an override that gives a section a value (``train=dataset_path=/data``, a dot missing), checked on its
    own: in one dotlist with the others, a later ``train.x=...`` would turn it back into a section, unsaid."""
    written: Any = OmegaConf.to_container(item_cfg, resolve=False)  # (its one key, as OmegaConf read it)
    expected: Any = default_tree
    key = []
    while isinstance(written, dict) and len(written) == 1 and isinstance(expected, dict):
        name, written = next(iter(written.items()))
        expected, key = expected.get(name), [*key, name]
    if isinstance(expected, dict) and not isinstance(written, dict):
        raise ConfigError(_section_error("command line", ".".join(key), expected, written))


def _section_error(source: str, key: str, expected: dict, value: Any) -> str:
    """The error for a value given to the section ``key``, with the dotted spelling when it reads as one of its
    settings."""
    inner = value.split("=", 1)[0] if isinstance(value, str) and "=" in value else None
    hint = f"; for one of its settings write {key}.{value}" if inner in expected else ""
    return f"{source}: {key} is a section (keys {sorted(expected)}), got {value!r}{hint}"


def _keep_spelling_of_text_settings(override_cfg: DictConfig, overrides: Sequence[str], default_tree: dict) -> None:
    """Give text settings (paths, names) the command line's own spelling where YAML read a number or a truth value:
    `0123` is not 83, `12:30` not 750, `1e3` not 1000.0, `no` not false (quoting, `key="'0123'"`, is then no longer
    needed), or a comment: `out #2` is not `out`. A key given twice takes its last spelling, as its value. A `#` that
    YAML took for a comment in any other setting is an error."""
    last = dict(item.split("=", 1) for item in overrides)
    for key, text in last.items():
        default = default_tree
        for name in key.split("."):
            default = default.get(name) if isinstance(default, dict) else None
        value = OmegaConf.select(override_cfg, key, default=None, throw_on_resolution_failure=False)
        commented = _has_yaml_comment(text)
        plain_text = isinstance(default, str) and not text.lstrip().startswith(("'", '"'))
        if plain_text and (commented or isinstance(value, (int, float))):  # (bool is an int)
            OmegaConf.update(override_cfg, key, text.strip(), merge=False)
        elif commented:
            raise ConfigError(
                f"command-line override {key}={text!r}: YAML reads '#' after a space as the start of a comment, "
                f"which leaves {value!r}; remove the comment"
            )


def _has_yaml_comment(text: str) -> bool:
    """Whether YAML would read part of a value as a comment: a `#` at its start or after a space, outside quotes."""
    quote = None
    for i, char in enumerate(text):
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return True
    return False


def _with_defaults_for_unresolvable(cfg: DictConfig, defaults: DictConfig) -> DictConfig:
    """A copy of `cfg` in which each interpolation that cannot be resolved here (an environment variable only a
    job will have) holds the key's default, so that the other values can be checked."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key in _dotted_keys(OmegaConf.to_container(cfg, resolve=False)):
        try:
            OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except OmegaConfBaseException:
            OmegaConf.update(copy, key, OmegaConf.select(defaults, key), merge=False)
    return copy


def _resolved(cfg: DictConfig, default_tree: dict, valid_keys: list[str]) -> DictConfig:
    """`cfg` with its interpolations resolved and the resolved values type-checked, or one ConfigError."""
    try:
        OmegaConf.resolve(cfg)  # interpolations fail here, in one line, rather than where a value is first read
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(
            f"{getattr(err, 'full_key', None) or 'config'}: {reason} (an environment variable is written "
            "${oc.env:NAME}, another setting ${section.key})"
        ) from None
    errors: list[str] = []
    tree = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(tree, dict)
    checked = _check_tree(tree, default_tree, "", "resolved interpolation", valid_keys, errors)
    if errors:
        raise ConfigError(
            "\n".join(errors) + "\n(${oc.env:NAME} gives a string; ${oc.decode:${oc.env:NAME}} gives a number)"
        )
    return OmegaConf.create(checked)


def _checked_layer(layer: DictConfig, default_tree: dict, valid_keys: list[str], source: str) -> DictConfig:
    """Reject unknown keys and mistyped values of one layer, drop the ignored legacy keys."""
    tree = OmegaConf.to_container(layer, resolve=False)
    assert isinstance(tree, dict)
    for key in IGNORED_KEYS:
        section, name = key.split(".")
        if isinstance(tree.get(section), dict) and name in tree[section]:
            tree[section].pop(name)
            target = IGNORED_KEYS[key]
            where = f"; set {target} to change this setting" if target else ""
            logger.warning("%s: %s is ignored, as it was in DINOv2/DinoBloom%s", source, key, where)
    for key in ZERO_ONLY_KEYS:
        section, name = key.split(".")
        if isinstance(tree.get(section), dict) and name in tree[section]:
            value = tree[section].pop(name)
            if value not in (0, 0.0):
                raise ConfigError(f"{source}: {key}={value!r} is not supported (only 0, as in DinoBloom's release)")
            logger.warning("%s: %s=0 is ignored (the smooth-rank loss was off in DinoBloom's release)", source, key)
    if "data_transform" in tree:
        _translate_data_transform(tree, source)
    errors: list[str] = []
    checked = _check_tree(tree, default_tree, "", source, valid_keys, errors)
    if errors:
        raise ConfigError("\n".join(errors))
    return OmegaConf.create(checked)


def _translate_data_transform(tree: dict, source: str) -> None:
    """Replace DinoBloom's ``data_transform`` key by the ``train.augmentation`` it stands for, in place."""
    value = tree.pop("data_transform")
    recipe = DINOBLOOM_DATA_TRANSFORMS.get(value) if isinstance(value, str) else None
    if recipe is None:
        raise ConfigError(
            f"{source}: data_transform={value!r} is not supported: DinoBloom's released config has 'default' "
            "(DinoBloom's augmentation, train.augmentation: hematology here); its experimental 'hema' class is not "
            "implemented"
        )
    if tree.get("train") is None:  # absent, or an empty `train:` in YAML
        tree["train"] = {}
    train = tree["train"]
    if not isinstance(train, dict):
        return  # the tree check names the malformed train section
    if train.get("augmentation", recipe) != recipe:
        raise ConfigError(
            f"{source}: data_transform={value!r} (train.augmentation: {recipe}) contradicts "
            f"train.augmentation={train['augmentation']!r}; keep one of the two"
        )
    train["augmentation"] = recipe
    logger.info("%s: DinoBloom's data_transform=%r is train.augmentation=%s", source, value, recipe)


def _check_tree(tree: dict, default: dict, prefix: str, source: str, valid: list[str], errors: list[str]) -> dict:
    out: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if name not in default:
            for leaf in _dotted_keys(value, key) if isinstance(value, dict) and value else [key]:
                errors.append(f"{source}: unknown key {leaf!r}{_suggestion(leaf, valid)}")
            continue
        expected = default[name]
        if isinstance(expected, dict):
            if value is None and source != "command line":  # an empty section in YAML
                continue
            if not isinstance(value, dict):
                errors.append(_section_error(source, key, expected, value))
                continue
            out[name] = _check_tree(value, expected, key + ".", source, valid, errors)
        else:
            try:
                out[name] = _coerce(value, expected, key)
            except ConfigError as err:
                errors.append(f"{source}: {err}")
    return out


def _coerce(value: Any, default: Any, key: str) -> Any:
    """`value` converted to the type of `default`, or ConfigError."""
    if isinstance(value, str) and value.startswith("${"):  # interpolations are resolved later
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # (every comparison with NaN is false: range checks would let it through)
                hint = "; 0 waits for ever" if key == "train.data_timeout_s" else ""
                raise ConfigError(f"{key} must be a finite number, got {value}{hint}")
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if value is None:  # `key=` on the command line, or an empty YAML value
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML read a number where a text was meant: `0123` is 83, `12:30` is 750, and the spelling is lost
            raise ConfigError(f"{key} must be a string, got the number {value!r}: quote it in the YAML file "
                              f"(e.g. {key.rsplit('.', 1)[-1]}: '0123')")  # fmt: skip
    elif isinstance(default, list):
        if isinstance(value, list):
            if default and isinstance(default[0], (int, float)):
                return [_coerce(v, default[0], f"{key}[{i}]") for i, v in enumerate(value)]
            return value
    else:
        return value
    raise ConfigError(f"{key} must be {_type_name(default)}, got {value!r} ({type(value).__name__})")


def _type_name(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    return "a list"


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    """All leaf keys of a nested mapping, dotted."""
    if not isinstance(tree, Mapping):
        return [prefix]
    keys: list[str] = []
    for name, value in tree.items():
        keys += _dotted_keys(value, f"{prefix}.{name}" if prefix else str(name))
    return keys


def closest_key(key: str, valid_keys: Sequence[str]) -> str | None:
    """The valid key `key` most likely meant: the same key in other letter case (`model.weights` for
    `MODEL.WEIGHTS`), the same leaf name in another section, else the closest spelling."""
    same_letters = [k for k in valid_keys if k.lower() == key.lower()]
    if same_letters:
        return same_letters[0]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid_keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0)[0]
    # a part of one key's name: `optim.epoch_length` for `train.OFFICIAL_EPOCH_LENGTH`
    inside = [k for k in valid_keys if len(leaf) >= 5 and leaf.lower() in k.rsplit(".", 1)[-1].lower()]
    if len(inside) == 1:
        return inside[0]
    match = difflib.get_close_matches(key, valid_keys, n=1, cutoff=0.6)
    if match:
        return match[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in valid_keys}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    return leaves[match[0]] if match else None


#: Settings derived from others, which a suggestion should name instead (setting them has no effect).
DERIVED_SETTINGS = {"optim.lr": "optim.base_lr"}


def _suggestion(key: str, valid_keys: Sequence[str]) -> str:
    best = closest_key(key, valid_keys)
    best = DERIVED_SETTINGS.get(best, best) if best != key.lower() else best
    return f"; did you mean {best}?" if best else ""


def _check_values(cfg: DictConfig, warn: bool = False) -> None:
    """Value checks that types alone cannot express (choices, ranges, architecture); ``warn``: also warn of the
    settings the architecture ignores (see :func:`resolve_arch`)."""
    problems = [*_choice_problems(cfg), *_precision_problems(cfg), *_range_problems(cfg), *_combination_problems(cfg)]
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    resolve_arch(cfg, warn=warn)


def _choice_problems(cfg: DictConfig) -> list[str]:
    """The settings of :data:`CHOICES` that are none of their choices."""
    problems: list[str] = []
    for key, options in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in options:
            problems.append(f"{key}={value!r} is not one of {', '.join(options)}")
    return problems


def _precision_problems(cfg: DictConfig) -> list[str]:
    """What is wrong in ``compute_precision``: unknown strategies or dtypes, and student and teacher laid out unlike."""
    problems: list[str] = []
    for role in ROLES:
        for part in PARTS:
            section = cfg.compute_precision[role][part]
            prefix = f"compute_precision.{role}.{part}"
            if section.sharding_strategy not in SHARDING_STRATEGIES:
                problems.append(
                    f"{prefix}.sharding_strategy={section.sharding_strategy!r} is not one of "
                    f"{', '.join(SHARDING_STRATEGIES)}"
                )
            for name, value in section.mixed_precision.items():
                if value not in DTYPE_NAMES:
                    problems.append(f"{prefix}.mixed_precision.{name}={value!r} is not one of {', '.join(DTYPE_NAMES)}")
            if section.mixed_precision.buffer_dtype != "fp32":
                problems.append(f"{prefix}.mixed_precision.buffer_dtype must be fp32 (FSDP2 keeps buffers as they are)")
    for part in PARTS:
        student_replicated = cfg.compute_precision.student[part].sharding_strategy == "NO_SHARD"
        teacher_replicated = cfg.compute_precision.teacher[part].sharding_strategy == "NO_SHARD"
        if student_replicated != teacher_replicated:
            problems.append(
                f"compute_precision.student.{part} and compute_precision.teacher.{part} must both be NO_SHARD or both "
                "be sharded: the teacher's EMA update needs parameters laid out alike"
            )
    return problems


def _range_problems(cfg: DictConfig) -> list[str]:
    """The numbers out of their range (positive counts, probabilities, [low, high] pairs) and empty names."""
    problems: list[str] = []
    if not cfg.train.output_dir:
        problems.append("train.output_dir is empty: name the folder the run writes to")
    blur = cfg.crops.blur_probabilities
    if blur is not None and (
        isinstance(blur, (str, int, float)) or len(blur) != 3
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b <= 1 for b in blur)
    ):
        problems.append(f"crops.blur_probabilities={blur} must be null or 3 probabilities (global 1, global 2, local)")
    for key in ("crops.global_crops_scale", "crops.local_crops_scale"):  # shares of the image: a crop is not empty
        value = list(OmegaConf.select(cfg, key))
        if len(value) != 2 or not 0 < value[0] <= value[1] <= 1:
            problems.append(f"{key}={value} must be [low, high] with 0 < low <= high <= 1")
    value = list(cfg.ibot.mask_ratio_min_max)
    if len(value) != 2 or not 0 <= value[0] <= value[1] <= 1:
        problems.append(f"ibot.mask_ratio_min_max={value} must be [low, high] with 0 <= low <= high <= 1")
    losses_with_heads = ("dino", "ibot") if cfg.ibot.separate_head else ("dino",)  # else iBOT uses DINO's head
    heads = [f"{loss}.head_{name}" for loss in losses_with_heads for name in
             ("n_prototypes", "bottleneck_dim", "nlayers", "hidden_dim")]  # fmt: skip
    positive = ("train.batch_size_per_gpu", "train.OFFICIAL_EPOCH_LENGTH", "optim.epochs", "train.log_period",
                "train.checkpoint_period", "train.keep_last_checkpoints", "crops.global_crops_size",
                "crops.local_crops_size", "student.patch_size", "optim.base_lr", "teacher.teacher_temp",
                "teacher.warmup_teacher_temp", *heads)
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            problems.append(f"{key} must be positive, got {OmegaConf.select(cfg, key)}")
    if not 0 <= cfg.optim.warmup_epochs <= cfg.optim.epochs:
        problems.append(
            f"optim.warmup_epochs={cfg.optim.warmup_epochs} must lie in [0, optim.epochs={cfg.optim.epochs}]"
        )
    non_negative = ("train.seed", "train.num_workers", "train.image_resize", "train.data_timeout_s",
                    "crops.local_crops_number", "optim.clip_grad", "optim.freeze_last_layer_epochs",
                    "evaluation.eval_period_iterations", "evaluation.knn_max_images", "dino.loss_weight",
                    "dino.koleo_loss_weight", "dino.koleo_pairwise_eps", "ibot.loss_weight", "optim.min_lr",
                    "optim.weight_decay", "optim.weight_decay_end", "optim.patch_embed_lr_mult",
                    "teacher.warmup_teacher_temp_epochs", "student.num_register_tokens", "student.block_chunks")
    for key in non_negative:
        if OmegaConf.select(cfg, key) < 0:
            problems.append(f"{key} must be >= 0, got {OmegaConf.select(cfg, key)}")
    for key in ("train.max_bad_image_fraction", "ibot.mask_sample_probability", "teacher.momentum_teacher",
                "teacher.final_momentum_teacher"):
        if not 0 <= OmegaConf.select(cfg, key) <= 1:
            problems.append(f"{key}={OmegaConf.select(cfg, key)} must lie in [0, 1]")
    for key in ("optim.adamw_beta1", "optim.adamw_beta2", "student.drop_path_rate"):
        if not 0 <= OmegaConf.select(cfg, key) < 1:
            problems.append(f"{key}={OmegaConf.select(cfg, key)} must lie in [0, 1)")
    if not 0 < cfg.optim.layerwise_decay <= 1:
        problems.append(f"optim.layerwise_decay={cfg.optim.layerwise_decay} must lie in (0, 1] (1 = no decay)")
    rankme_period, rankme_batches = cfg.evaluation.rankme_period_iterations, cfg.evaluation.rankme_batches
    if rankme_period < 0 or (rankme_period > 0 and not 1 <= rankme_batches <= rankme_period):
        problems.append(
            f"evaluation.rankme_period_iterations={rankme_period} must be >= 0 (0 = no RankMe), and "
            f"evaluation.rankme_batches={rankme_batches} must lie in [1, rankme_period_iterations]"
        )
    return problems


def _combination_problems(cfg: DictConfig) -> list[str]:
    """Settings that mean nothing without another (compile options without ``train.compile``, no loss at all)."""
    problems: list[str] = []
    if cfg.train.compile_tuning and not cfg.train.compile:
        problems.append("train.compile_tuning=true tunes what train.compile compiles: set train.compile=true too")
    if cfg.train.cuda_graphs and not cfg.train.compile:
        problems.append("train.cuda_graphs=true replays what train.compile compiles: set train.compile=true too")
    if cfg.train.compile_scope != "blocks" and not cfg.train.compile:
        scope = cfg.train.compile_scope
        problems.append(f"train.compile_scope={scope} chooses what train.compile compiles: set train.compile=true too")
    if cfg.dino.loss_weight <= 0 and cfg.ibot.loss_weight <= 0:
        problems.append("dino.loss_weight and ibot.loss_weight are both 0: nothing would be trained")
    return problems


def resolve_arch(cfg: DictConfig, *, warn: bool = False) -> ArchSpec:
    """The student backbone described by `cfg.student` (and `cfg.crops.global_crops_size` as image size).

    A DINOv2 hub name (`dinov2_vitb14`, ...) is built exactly as DinoBloom's `torch.hub.load` built it: the hub's
    patch size, FFN, registers, interpolation, LayerScale init and no drop path; student.* values that differ from
    those are ignored (with a warning if `warn`: the config check warns, the later calls of a run stay silent).
    Architecture names (`vit_base`, ...) take every setting from `cfg.student`; `student.embed_dim/depth/num_heads`
    > 0 replace the architecture's size.
    """
    from dinov2.models import ARCH_SIZES, HUB_MODELS  # deferred: importing the models imports torch

    student = cfg.student
    arch = str(student.arch)
    hub_name = arch if arch.startswith("dinov2_") else None
    if hub_name is not None:
        if hub_name not in HUB_MODELS:
            hub_names = ", ".join(name for name in HUB_MODELS if name.startswith("dinov2_"))
            raise ConfigError(f"student.arch={arch!r} is not a DINOv2 hub model; expected one of {hub_names}")
        name, hub_settings = HUB_MODELS[hub_name]
    elif arch in ARCH_SIZES:
        name, hub_settings = arch, {}
    else:
        known = ", ".join([*ARCH_SIZES, *(n for n in HUB_MODELS if n.startswith("dinov2_"))])
        raise ConfigError(f"student.arch={arch!r} is unknown; expected one of {known}")

    embed_dim, depth, num_heads = ARCH_SIZES[name]
    custom = {"embed_dim": student.embed_dim, "depth": student.depth, "num_heads": student.num_heads}
    for key, value in custom.items():
        if value < 0:
            raise ConfigError(f"student.{key} must be >= 0 (0 = the architecture's value), got {value}")
        if value and hub_name is not None:
            raise ConfigError(f"student.{key}={value} cannot change the size of the hub architecture {hub_name}")
    embed_dim = student.embed_dim or embed_dim
    depth = student.depth or depth
    num_heads = student.num_heads or num_heads
    if embed_dim % num_heads:
        raise ConfigError(f"student.embed_dim={embed_dim} is not divisible by student.num_heads={num_heads}")

    kwargs: dict[str, Any] = dict(
        img_size=int(cfg.crops.global_crops_size),
        patch_size=int(student.patch_size),
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=bool(student.qkv_bias),
        proj_bias=bool(student.proj_bias),
        ffn_bias=bool(student.ffn_bias),
        drop_path_rate=float(student.drop_path_rate),
        drop_path_uniform=bool(student.drop_path_uniform),
        init_values=float(student.layerscale) if student.layerscale else None,
        ffn_layer=str(student.ffn_layer),
        block_chunks=int(student.block_chunks),
        num_register_tokens=int(student.num_register_tokens),
        interpolate_antialias=bool(student.interpolate_antialias),
        interpolate_offset=float(student.interpolate_offset),
    )
    if hub_name is not None:
        if int(student.patch_size) != hub_settings["patch_size"]:
            raise ConfigError(
                f"student.patch_size={student.patch_size} contradicts student.arch={hub_name} "
                f"(patch {hub_settings['patch_size']})"
            )
        # The hub builder's settings, plus the DinoVisionTransformer defaults it relied on.
        forced = {key: value for key, value in hub_settings.items() if key in kwargs and key != "img_size"}
        forced.update(drop_path_rate=0.0, qkv_bias=True, proj_bias=True, ffn_bias=True)
        cfg_names = {"init_values": "layerscale"}
        for key, value in forced.items():
            if kwargs[key] != value and warn:
                logger.warning(
                    "student.%s=%r is ignored: student.arch=%s builds the hub model, which uses %r",
                    cfg_names.get(key, key), kwargs[key], hub_name, value,
                )
            kwargs[key] = value
    patch = kwargs["patch_size"]
    sizes = {"global_crops_size": cfg.crops.global_crops_size}
    if cfg.crops.local_crops_number > 1:  # 1 means no local crops (DinoBloom)
        sizes["local_crops_size"] = cfg.crops.local_crops_size
    for key, size in sizes.items():
        if size % patch:
            raise ConfigError(f"crops.{key}={size} is not a multiple of the patch size {patch}")
    if kwargs["block_chunks"] and depth % kwargs["block_chunks"]:
        raise ConfigError(f"student.block_chunks={kwargs['block_chunks']} does not divide the depth {depth}")
    return ArchSpec(name=name, hub_name=hub_name, kwargs=kwargs)


def apply_scaling_rules_to_cfg(cfg: DictConfig, world_size: int) -> DictConfig:
    """Set `optim.lr` from `optim.base_lr` and the total batch size (in place; also returned).

    As in DINOv2, a value already in `optim.lr` is replaced; a different non-zero one is named in a warning, since
    it has no effect (`optim.base_lr` sets the learning rate).
    """
    total_batch = cfg.train.batch_size_per_gpu * world_size
    rule = cfg.optim.scaling_rule
    if rule == "sqrt_wrt_1024":
        lr = cfg.optim.base_lr * math.sqrt(total_batch / 1024.0)
    elif rule == "linear_wrt_256":
        lr = cfg.optim.base_lr * total_batch / 256.0
    else:
        raise ConfigError(f"optim.scaling_rule={rule!r} is not one of {', '.join(CHOICES['optim.scaling_rule'])}")
    if cfg.optim.lr and not math.isclose(cfg.optim.lr, lr, rel_tol=1e-9):
        logger.warning(
            "optim.lr=%g is ignored: the learning rate is optim.base_lr=%g scaled by %s for the total batch %d (= %g); "
            "set optim.base_lr to change it", cfg.optim.lr, cfg.optim.base_lr, rule, total_batch, lr,
        )
    cfg.optim.lr = lr
    logger.info("%s: base lr %.3g, total batch %d -> lr %.3g", rule, cfg.optim.base_lr, total_batch, cfg.optim.lr)
    warn_about_schedules(cfg)
    return cfg


def warn_about_schedules(cfg: DictConfig) -> None:
    """Warn of schedule settings that are valid but rarely meant: a final learning rate above the peak, or a
    warm-up or last-layer freeze as long as the whole run. Rank 0 only: every rank has the same config."""
    from dinov2 import distributed

    if not distributed.is_main_process():
        return
    epochs = cfg.optim.epochs
    if cfg.optim.min_lr > cfg.optim.lr:
        logger.warning("optim.min_lr=%g is above the learning rate %g: after the warm-up the learning rate rises "
                       "to it instead of decaying", cfg.optim.min_lr, cfg.optim.lr)  # fmt: skip
    for key, what in (("optim.warmup_epochs", "the learning rate never reaches its peak"),
                      ("optim.freeze_last_layer_epochs", "the heads' last layers never train"),
                      ("teacher.warmup_teacher_temp_epochs", "the teacher temperature never reaches "
                       "teacher.teacher_temp")):  # fmt: skip
        value = OmegaConf.select(cfg, key)
        if value >= epochs > 0:
            logger.warning("%s=%s is not shorter than the run's optim.epochs=%s: %s", key, value, epochs, what)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> resolved value of every leaf of a config (lists are leaves)."""
    flat: dict[str, Any] = {}
    pending: list[tuple[str, Any]] = [("", OmegaConf.to_container(cfg, resolve=True))]
    while pending:
        prefix, node = pending.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                pending.append((f"{prefix}{key}.", value))
            else:
                flat[f"{prefix}{key}"] = value
    return flat


def config_differences(before: DictConfig, after: DictConfig, ignore: Sequence[str] = ()) -> list[str]:
    """``key: old -> new`` for each dotted key whose value differs between two configs (lists compare whole), except
    the keys in ``ignore``."""
    old, new = flat_config(before), flat_config(after)
    absent = "(absent)"
    return [
        f"{key}: {old.get(key, absent)} -> {new.get(key, absent)}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, absent) != new.get(key, absent) and key not in ignore
    ]


def write_config(cfg: DictConfig, output_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved configuration to `output_dir/name` (atomically) and return the path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / name
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


__all__ = [
    "ArchSpec",
    "ConfigError",
    "DEFAULT_CONFIG_FILE",
    "TRAIN_CONFIG_DIR",
    "apply_scaling_rules_to_cfg",
    "closest_key",
    "config_differences",
    "default_config",
    "flat_config",
    "load_config",
    "resolve_arch",
    "write_config",
]
