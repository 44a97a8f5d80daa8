from .loader import (ConfigError, apply_overrides, check_img_size, config_from_dict, config_to_dict,
                     copy_config, load_config, max_stride, resolve_config, save_config,
                     validate_values)
from .schema import Config

__all__ = ["Config", "ConfigError", "apply_overrides", "check_img_size", "config_from_dict",
           "config_to_dict", "copy_config", "load_config", "max_stride", "resolve_config",
           "save_config", "validate_values"]
