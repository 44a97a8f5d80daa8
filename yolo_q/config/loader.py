"""Load YAML configs onto the typed schema: ``_base_`` inheritance, dot-list overrides,
validation errors that name the key, the file and a close match."""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..io import read_checkpoint_any, write_text_atomic
from .schema import CHOICES, LEGACY_DEFAULTS, Config

PathLike = Union[str, os.PathLike]
REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and its source."""


def _all_keys(node: Any, prefix: str = "") -> list:
    keys = []
    if isinstance(node, DictConfig):
        try:  # without resolving ${...}: a broken interpolation must not break the hint
            for k in node.keys():
                full = f"{prefix}.{k}" if prefix else str(k)
                keys.append(full)
                child = node._get_node(k)
                keys.extend(_all_keys(child, full) if isinstance(child, DictConfig) else [])
        except OmegaConfBaseException:
            pass
    return keys


def _printable(text: str) -> str:
    """Escape control characters (newlines...) so that an error message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _explain(err: OmegaConfBaseException, source: str, schema: DictConfig,
             default_key: str = "") -> ConfigError:
    key = getattr(err, "full_key", None) or default_key
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    candidates = _all_keys(schema)
    hint = ""
    if key and "did you mean" not in msg.lower():
        parent, _, leaf = key.rpartition(".")
        siblings = [c.rpartition(".")[2] for c in candidates if c.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
        if close and close[0] != leaf:
            hint = f" (did you mean '{(parent + '.') if parent else ''}{close[0]}'?)"
    return ConfigError(f"{source}: invalid key '{_printable(key)}': {msg}{hint}")


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_path(path: PathLike, relative_to: Optional[Path] = None) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for base in ([relative_to] if relative_to else []) + [Path.cwd(), REPO_ROOT]:
        if (base / p).exists():
            return base / p
    return (relative_to or Path.cwd()) / p


def _merge_file(cfg: DictConfig, path: Path, seen: tuple) -> DictConfig:
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: key '_base_' must be a config file name or a list of them, "
                          f"got {bases!r}")
    for b in bases:
        base = _resolve_path(b, path.parent)
        if not base.is_file():
            raise ConfigError(f"{path}: key '_base_': config file not found: {_printable(base)}")
        cfg = _merge_file(cfg, base, seen + (path,))
    try:
        return OmegaConf.merge(cfg, OmegaConf.create(data))
    except OmegaConfBaseException as e:
        raise _explain(e, str(path), cfg) from None


def load_config(path: Optional[PathLike] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Return the validated config: schema defaults <- ``_base_`` files <- ``path`` <- overrides.

    ``overrides`` are dot-list strings such as ``train.epochs=3``.
    """
    cfg = OmegaConf.structured(Config)
    source = "defaults"
    if path is not None:
        path = _resolve_path(path)
        cfg = _merge_file(cfg, path, ())
        source = str(path)
    cfg = apply_overrides(cfg, overrides)
    source = source if not overrides else f"{source} + command line"
    try:  # bad ${...} interpolations fail here, naming the key, not later mid-run
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise _explain(e, source, OmegaConf.structured(Config)) from None
    validate_choices(cfg, source)
    validate_values(cfg, source)
    return cfg


def max_stride(cfg: DictConfig, source: str = "config") -> int:
    """The model's largest stride (``model.head.strides``); image sizes must be multiples of it."""
    strides = list(cfg.model.head.strides or [])
    if not strides or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                              for s in strides):
        raise ConfigError(f"{source}: invalid value {strides} for 'model.head.strides': must be "
                          f"a list of positive integers")
    return max(strides)


def check_img_size(img_size: Any, cfg: DictConfig, key: str = "data.img_size",
                   source: str = "config") -> int:
    """``img_size`` as an int, else :class:`ConfigError` naming ``key``: it must be a positive
    multiple of the model's max stride (else the neck's feature maps do not line up)."""
    stride = max_stride(cfg, source)
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 \
            or img_size % stride:
        low = max(stride, (img_size // stride) * stride) if isinstance(img_size, int) else stride
        hint = f" (e.g. {low} or {low + stride})" if isinstance(img_size, int) else ""
        raise ConfigError(f"{source}: invalid value {img_size} for '{key}': must be a positive "
                          f"multiple of the model's max stride {stride}{hint}")
    return img_size


def validate_values(cfg: DictConfig, source: str = "config") -> None:
    """Checks across keys that the schema's types cannot express (image size vs model stride)."""
    check_img_size(cfg.data.img_size, cfg, "data.img_size", source)


def validate_choices(cfg: DictConfig, source: str = "config") -> None:
    """Check the string options that take one of a fixed set of values."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        values = list(value) if OmegaConf.is_list(value) else [value]
        for value in values:
            if value in choices:
                continue
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: invalid value '{value}' for '{key}'; "
                              f"choose one of {', '.join(choices)}{hint}")
    eps, mom = OmegaConf.select(cfg, "model.bn_eps"), OmegaConf.select(cfg, "model.bn_momentum")
    if eps is not None and not eps > 0:
        raise ConfigError(f"{source}: invalid value '{eps}' for 'model.bn_eps'; must be > 0")
    if mom is not None and not 0 <= mom <= 1:
        raise ConfigError(f"{source}: invalid value '{mom}' for 'model.bn_momentum'; "
                          f"must be in [0, 1]")


def apply_overrides(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    overrides = list(overrides)
    for ov in overrides:
        if "=" not in ov or not ov.split("=", 1)[0].strip():
            raise ConfigError(f"command line: override '{_printable(ov)}' must look like key=value")
    for ov in overrides:  # one at a time, so that an error can name its override
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))
        except (yaml.YAMLError, UnicodeError) as e:
            raise ConfigError(f"command line: override '{_printable(ov)}': value is not valid YAML "
                              f"({str(e).splitlines()[0]})") from None
        except OmegaConfBaseException as e:
            raise _explain(e, "command line", cfg, default_key=ov.split("=", 1)[0]) from None
    return cfg


def copy_config(cfg: DictConfig, overrides: Iterable[str] = (), struct: bool = False) -> DictConfig:
    """A private, fully resolved copy of ``cfg`` with the dot-list ``overrides`` applied
    (``struct``: unknown keys then fail on assignment too)."""
    out = apply_overrides(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), overrides)
    if struct:
        OmegaConf.set_struct(out, True)
    return out


def resolve_config(config: Optional[PathLike] = None, overrides: Sequence[str] = (),
                   weights: Optional[PathLike] = None) -> DictConfig:
    """The one config resolver of the tools: ``config`` (+ overrides), else the one stored in
    the yolo_q checkpoint ``weights``, else the defaults (+ overrides)."""
    if config:
        return load_config(config, overrides)
    if weights and str(weights).endswith((".pt", ".pth")):
        stored = read_checkpoint_any(weights).get("config")
        if stored:
            cfg = apply_overrides(config_from_dict(stored), overrides)
            source = f"{weights} (stored config){' + command line' if overrides else ''}"
            validate_choices(cfg, source)  # as load_config does for a YAML
            validate_values(cfg, source)
            return cfg
    return load_config(None, overrides)


def save_config(cfg: DictConfig, path: PathLike) -> Path:
    """Write the fully resolved config as YAML (atomically)."""
    return write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def with_legacy_defaults(data: dict) -> dict:
    """A stored config dict with :data:`LEGACY_DEFAULTS` filled in where its section exists but
    lacks the key: a config written before the key existed meant the value of that time.
    Sections may be nested (``quant.qat``); the input is not modified (sections on the way are
    copied)."""
    data = dict(data)
    for key, value in LEGACY_DEFAULTS.items():
        *path, leaf = key.split(".")
        node = data
        for part in path:
            if not isinstance(node.get(part), dict):
                break
            node[part] = dict(node[part])
            node = node[part]
        else:
            node.setdefault(leaf, value)
    return data


def config_from_dict(data: dict) -> DictConfig:
    """Rebuild a validated config from a plain dict (e.g. the one stored in a checkpoint).

    Keys the dict lacks take the value they had before they were added (``LEGACY_DEFAULTS``:
    a checkpoint trained before ``model.bn_eps`` existed used 1e-5), then the schema default."""
    try:
        return OmegaConf.merge(OmegaConf.structured(Config),
                               OmegaConf.create(with_legacy_defaults(data)))
    except OmegaConfBaseException as e:
        raise _explain(e, "checkpoint config", OmegaConf.structured(Config)) from None


def config_to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
