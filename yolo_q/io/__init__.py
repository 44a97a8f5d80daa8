"""Ground-floor file I/O every floor may use: atomic writes, checkpoint save/load
(``weights_only``), the restricted unpickler / official-checkpoint reader, JSON helpers and
denormal flushing. Imports nothing above it (stdlib, numpy, torch only)."""
from .checkpoint import CheckpointError, load_checkpoint, load_state_into, save_checkpoint
from .denormal import flush_denormal
from .files import (PathLike, atomic_path, jsonable, read_json, to_builtin, write_bytes_atomic,
                    write_json, write_text_atomic)
from .official import (OFFICIAL_EXTRA_PREFIXES, OfficialCheckpoint, check_official_function,
                       official_settings, read_official, read_official_checkpoint)
from .weights import is_deploy_form, read_checkpoint_any

__all__ = ["CheckpointError", "OFFICIAL_EXTRA_PREFIXES", "OfficialCheckpoint", "PathLike",
           "atomic_path", "check_official_function", "official_settings", "read_official",
           "flush_denormal", "is_deploy_form", "jsonable", "load_checkpoint", "load_state_into",
           "read_checkpoint_any", "read_json", "read_official_checkpoint", "save_checkpoint",
           "to_builtin", "write_bytes_atomic", "write_json", "write_text_atomic"]
