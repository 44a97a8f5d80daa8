"""Ground-floor file I/O every floor may use: atomic writes, checkpoint save/load
(``weights_only``), the restricted unpickler / official-checkpoint reader, JSON helpers and
denormal flushing. Imports nothing above it (stdlib, numpy, torch only)."""
from .checkpoint import (CheckpointError, check_checkpoint_file, half_state, load_checkpoint,
                         load_state_into, save_checkpoint)
from .denormal import flush_denormal
from .files import (PathLike, atomic_path, jsonable, process_umask, read_json, to_builtin,
                    write_bytes_atomic, write_json, write_text_atomic)
from .paths import (OutputPathError, check_output_dir, check_output_file, make_output_dir,
                    same_path)
from .official import (OFFICIAL_EXTRA_PREFIXES, OfficialCheckpoint, check_official_function,
                       official_settings, read_official, read_official_checkpoint)
from .weights import is_deploy_form, read_checkpoint_any

__all__ = ["CheckpointError", "OFFICIAL_EXTRA_PREFIXES", "OfficialCheckpoint", "OutputPathError",
           "PathLike", "atomic_path", "check_checkpoint_file", "check_official_function",
           "check_output_dir", "check_output_file", "half_state", "official_settings", "read_official",
           "flush_denormal", "is_deploy_form", "jsonable", "load_checkpoint", "load_state_into",
           "make_output_dir", "process_umask", "read_checkpoint_any", "read_json",
           "read_official_checkpoint", "same_path", "save_checkpoint", "to_builtin",
           "write_bytes_atomic", "write_json", "write_text_atomic"]
