"""Where the project is, seen from inside a DVC temporary copy too."""

from pathlib import Path


def project_root(path: Path) -> Path:
    """The repository a (possibly temporary, DVC-made) working copy belongs to."""
    parts = path.resolve().parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path.resolve()
