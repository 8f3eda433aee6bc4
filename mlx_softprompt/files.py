"""Writing and checking user files: the one atomic writer, and the safetensors framing check.

Nothing a user made is lost half-written: every output goes to a temporary
file beside its target, is flushed to disk, then renamed over it, so a reader
sees the old file or the new one, never a mix.
"""

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError


def umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path, directory: bool = False) -> None:
    """Give a mkstemp/mkdtemp result (0600/0700) the mode open()/mkdir() would have given it:
    outputs are meant to be shared (0644/0755 under umask 022)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_write(path, write_fn) -> Path:
    """Call write_fn(tmp_path) then rename over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    as_if_created(tmp)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, obj, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, default=float))


def check_safetensors(path) -> None:
    """Validate the safetensors framing ourselves so a damaged file gives one clear line."""
    from .checks import safetensors_header

    safetensors_header(path)
