"""What a user asks `stage` for, checked before orchestration starts and before any write: model
names by the Hub's own rules, where the source is, and (for a local checkpoint) every file it would
send. Each refusal is one line naming the fix; nothing here touches the network."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from modelferry.tasks.errors import SettingsError, SourceError
from modelferry.tasks.records.integrity import check_key_length, check_relpath
from modelferry.tasks.records.layout import model_prefix

SKIP_DIRS = {".git", ".cache", "__pycache__", ".huggingface"}
LOCAL_REVISION_CHARS = len("local-") + 16  # see integrity.local_revision


def model_name(name: str, what: str) -> str:
    """`name` if it is an org/name the Hub would accept (its own validator), else SettingsError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1:
        raise SettingsError(f"{what} {name!r} is not a model name: it must be org/name")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise SettingsError(f"{what} {name!r} is not a model name: org/name of letters, digits, '-', '_' and '.', "
                            "at most 96 characters, no '--' or '..' (the Hub's rules)") from None
    return name


def transferable(path: str) -> str:
    """s5cmd reads one quoted command per line: a double quote or a newline can't be passed to it."""
    if '"' in path or "\n" in path or "\r" in path:
        raise SettingsError(f"cannot stage {path!r}: file names with a double quote or a line break can't be "
                            "uploaded; rename it or leave it out with --exclude")
    return path


@dataclass(frozen=True)
class Source:
    kind: str  # "local" | "hub"
    where: str  # an absolute directory, or a Hub repo id
    name: str  # org/name it is staged under


def where_from(source: str, name: str | None) -> Source:
    """Decide whether `source` is a local directory or a Hub repo, and the name to stage it under."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SettingsError(f"{source} is a file: pass the checkpoint's directory")
        if not name:
            raise SettingsError(f"{source} is a local directory: pass --name org/name to say what to call it")
        transferable(str(path.resolve()))
        return Source("local", str(path.resolve()), model_name(name, "--name"))
    if _looks_like_path(source):
        raise SettingsError(f"no such directory: {source}")
    try:
        model_name(source, "source")
    except SettingsError:
        raise SettingsError(f"{source!r} is neither an existing directory nor a Hub repo id (org/name)") from None
    return Source("hub", source, model_name(name, "--name") if name else source)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source in (".", "..") or source.count("/") > 1 \
        or os.sep != "/" and os.sep in source


def walk_local(root: Path, include: list[str], exclude: list[str]) -> list[tuple[str, Path]]:
    """(relative path, path) of every file of a local checkpoint to stage, each checked to be safe
    to send; SourceError/SettingsError naming the first that isn't."""
    if not root.is_dir():
        raise SourceError(f"{root} is not a directory")
    found = []
    try:
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                rel = path.relative_to(root).as_posix()
                if include and not any(fnmatch.fnmatch(rel, g) for g in include):
                    continue
                if any(fnmatch.fnmatch(rel, g) for g in exclude):
                    continue
                if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
                    raise SourceError(f"{rel} links outside {root}: copy the file in instead")
                found.append((transferable(check_relpath(rel)), path))
    except PermissionError as exc:
        raise SourceError(f"cannot read {exc.filename}: permission denied") from None
    if not found:
        what = "is empty" if not include and not exclude else f"has no file matching include={include} exclude={exclude}"
        raise SourceError(f"{root} {what}")
    return found


def _raise(exc: OSError):
    raise exc


def check_loadable(paths: list[str], allow_unloadable: bool) -> None:
    if allow_unloadable:
        return
    problems = []
    if "config.json" not in paths:
        problems.append("no config.json")
    if not any(p.endswith(".safetensors") for p in paths):
        weights = [p for p in paths if p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        problems.append("weights are not safetensors" + (f" ({weights[0]}...)" if weights else " (none found)"))
    if problems:
        raise SourceError(f"vLLM could not load this: {'; '.join(problems)}. Pass --allow-unloadable to stage it anyway")


def check_keys(name: str, revision_chars: int, paths: list[str]) -> None:
    """Every object key would fit S3's limit."""
    for path in paths:
        check_key_length(model_prefix(name, "0" * revision_chars) + path)


def check(source: str, name: str | None, include: list[str], exclude: list[str], allow_unloadable: bool) -> Source:
    """Everything about a stage request that needs neither the bucket nor the Hub. For a local
    checkpoint that is every file name it would send."""
    src = where_from(source, name)
    if src.kind == "local":
        paths = [rel for rel, _ in walk_local(Path(src.where), include, exclude)]
        check_loadable(paths, allow_unloadable)
        check_keys(src.name, LOCAL_REVISION_CHARS, paths)
    return src
