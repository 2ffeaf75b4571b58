"""Files: how logitguard writes outputs safely (`transactions`, `staging`) and its saved-array format (`archive`).

The lowest layer beside `logitguard.errors`: everything else, the producer included, writes through here.
"""

from .archive import check_format_version, file_sha256, load_arrays, read_header, save_arrays
from .staging import StagedDirectory, link_or_copy, staged_output
from .transactions import (OutputLock, atomic_output, check_writable, claim_output, clean_stale, current_umask,
                           describe_os_error, refuse_overwrite)

__all__ = ["OutputLock", "StagedDirectory", "atomic_output", "check_format_version", "check_writable",
           "claim_output", "clean_stale", "current_umask", "describe_os_error", "file_sha256", "link_or_copy",
           "load_arrays", "read_header", "refuse_overwrite", "save_arrays", "staged_output"]
