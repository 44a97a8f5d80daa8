from .loader import (ConfigError, apply_overrides, config_from_dict, config_to_dict, copy_config,
                     load_config, resolve_config, save_config)
from .schema import Config

__all__ = ["Config", "ConfigError", "apply_overrides", "config_from_dict", "config_to_dict", "copy_config",
           "load_config", "resolve_config", "save_config"]
