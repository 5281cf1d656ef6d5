"""`package`: model.tar.gz from a diffusers folder, with the folder's files at the
archive root (SageMaker extracts it to /opt/ml/model, where `sdserve serve`
looks for model_index.json)."""

from __future__ import annotations

import fnmatch
import os
import tarfile
from pathlib import Path

from .checks import check_model_dir
from .errors import UserError

DEFAULT_EXCLUDES = [".*", "*/.*"]  # .git, .cache, .huggingface, .gitattributes, ...


def package_model(
    model_dir: Path, output: Path, excludes: list[str] | None = None, compresslevel: int = 1
) -> tuple[Path, int, int]:
    """Writes model.tar.gz with the folder's files at the archive root.

    Symlinks are followed (Hugging Face cache snapshots are symlinks into blobs/)
    and hidden files are skipped. Returns (path, number of files, bytes).
    """
    model_dir = check_model_dir(model_dir)
    patterns = DEFAULT_EXCLUDES + list(excludes or [])
    output = output.resolve()
    files: list[tuple[Path, str]] = []
    for root, dirs, names in os.walk(model_dir, followlinks=True):
        rel_root = Path(root).relative_to(model_dir)
        dirs[:] = sorted(
            d for d in dirs if not _excluded((rel_root / d).as_posix(), patterns)
        )
        for n in sorted(names):
            rel = (rel_root / n).as_posix()
            p = Path(root) / n
            if _excluded(rel, patterns) or p.resolve() == output:
                continue
            if not p.exists():
                raise UserError(f"{p} is a broken symlink")
            files.append((p, rel))
    output.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    tmp = output.with_name(output.name + ".partial")
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=compresslevel, dereference=True) as tar:
            for p, rel in files:
                tar.add(p, arcname=rel, recursive=False)
                total += p.stat().st_size
        tmp.replace(output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return output, len(files), total


def _excluded(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, pat) for pat in patterns)
