"""Where artefacts live, and how they are written: atomically, so a crash never leaves half a file."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import resource
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import xxhash

from stages.errors import DiskFullError, PathError


@dataclass(frozen=True)
class Layout:
    """The artefact layout of DESIGN.md, rooted at the project (or a DVC temp copy).

    Every directory handed out is first resolved and checked to lie inside `root`, so a
    symlinked `runs/` or `data/prompts/` leading elsewhere stops a stage before it writes
    (or deletes) anything there. Files are written by renaming into these directories, and
    a rename replaces a symlink rather than writing through it.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.root.exists() and not self.root.is_dir():
            raise PathError(f"--root {self.root}: not a directory")

    def inside(self, path: Path) -> Path:
        """`path` itself, once it is known to resolve inside the run directory."""
        root, resolved = self.root.resolve(), Path(path).resolve()
        if resolved != root and root not in resolved.parents:
            raise PathError(f"{path} resolves to {resolved}, outside the run directory {root}; "
                            f"artefacts are only written inside it")
        return path

    @property
    def prompts(self) -> Path:
        return self.inside(self.root / "data" / "prompts")

    def prompt_split(self, split: str) -> Path:
        return self.prompts / f"{split}.parquet"

    @property
    def reference(self) -> Path:
        return self.inside(self.root / "models" / "reference")

    @property
    def policy(self) -> Path:
        return self.inside(self.root / "models" / "policy")

    @property
    def runs(self) -> Path:
        return self.inside(self.root / "runs")

    def iteration(self, index: int) -> Path:
        return self.inside(self.runs / "iterations" / f"{index:04d}")

    def checkpoint(self, index: int) -> Path:
        return self.inside(self.runs / "checkpoints" / f"{index:04d}")

    @property
    def metrics(self) -> Path:
        return self.inside(self.root / "metrics")


_UMASK = os.umask(0o022)  # read once, at import: os.umask can only be read by setting it
os.umask(_UMASK)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the artefact gets normal permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- a full disk -------------------------------------------------------------------------
# A write that finds no space (ENOSPC), hits the process's file-size limit (EFBIG, `ulimit -f`)
# or a quota (EDQUOT) is refused by the atomic writes above before anything is renamed into
# place; what is left is to say so in one line. Libraries report it in their own words: an
# OSError from Python and pyarrow, "os error 28" in safetensors' Rust error.
_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_SPACE_WORDS = {os.strerror(number): number for number in _SPACE_ERRNOS}
_SPACE_IN_WORDS = re.compile(r"os error (\d+)\b|" + "|".join(map(re.escape, _SPACE_WORDS)))


def space_errno(error: BaseException) -> int | None:
    """ENOSPC, EFBIG or EDQUOT, if that is why `error` happened, from its errno or its words."""
    if isinstance(error, OSError) and error.errno in _SPACE_ERRNOS:
        return error.errno
    for match in _SPACE_IN_WORDS.finditer(str(error)):
        number = int(match.group(1)) if match.group(1) else _SPACE_WORDS[match.group(0)]
        if number in _SPACE_ERRNOS:
            return number
    return None


def readable_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def free_space(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _no_room_for(size: int, target: Path) -> bool:
    """Whether `size` bytes cannot fit: for a library that reports a failed write in words of its own
    (torch's zip writer says "unexpected pos")."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return free_space(target) < size or (limit != resource.RLIM_INFINITY and limit < size)


@contextmanager
def space_checked(target: Path, needed: Callable[[], int]) -> Iterator[None]:
    """Within: a write that runs out of space becomes a DiskFullError naming `target` and the size it needed."""
    try:
        yield
    except Exception as error:
        number = space_errno(error)
        if number is None and not _no_room_for(needed(), target):
            raise
        reason = os.strerror(number) if number else "no room (no space left, or the file-size limit)"
        raise DiskFullError(f"{target}: {reason} writing {readable_size(needed())} ({readable_size(free_space(target))} "
                            f"free on its filesystem); nothing was replaced: free some space and run the same "
                            f"command to resume") from None


def write_bytes(target: Path, data: bytes) -> None:
    with space_checked(target, lambda: len(data)), atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode())


def write_json(target: Path, payload: Any) -> None:
    write_text(target, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(target: Path, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()  # serialised first: its size is known if the disk turns out full
    frame.to_parquet(buffer, index=False)
    write_bytes(target, buffer.getvalue())


def write_dir(target: Path, fill: Callable[[Path], None], needed: Callable[[], int]) -> None:
    """`fill` a fresh staging directory beside `target`, then swap it in: never half a directory.

    `needed` estimates the bytes it takes, for the message when the disk is full.
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp")
    with space_checked(target, needed):
        try:
            fill(fresh_dir(staging))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk needs its space back
            raise
        replace_dir(staging, target)


def file_digest(path: Path) -> str:
    """XXH3-128 of a file's bytes.

    The manifests guard against accidents (a crash, a stray edit, a damaged disk), not an
    adversary, and a run digests its ~10 MB checkpoint every iteration: XXH3 does that in
    about 1 ms where SHA-256 takes 7 (DVC makes the same trade with MD5).
    """
    digest, block = xxhash.xxh3_128(), bytearray(1 << 20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(block):  # one reused buffer: a third of read()'s cost
            digest.update(view[:size])
    return digest.hexdigest()


def tree_digest(path: Path) -> str:
    """Digest of a file, or of every file under a directory (names and contents)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    digest = xxhash.xxh3_128()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode())
        digest.update(file_digest(child).encode())
    return digest.hexdigest()


def value_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written `staging` directory in for `target` (two renames, no copy)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)


def fresh_dir(path: Path) -> Path:
    """An empty directory at `path` (whatever a crashed run left there is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
