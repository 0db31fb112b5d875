"""`make mirrors`' work: the eval sets' published files downloaded at a pinned revision, SHA256-checked, unpacked.

Each source in `configs/mirrors.yaml` names a hub dataset repo, a revision and its files with their SHA256 (null: not
pinned yet — the first download prints and records what it saw). A zip (CMMLU's `cmmlu_v1_0_1.zip`, C-Eval's
`ceval-exam.zip`) is unpacked; other files (the parquet conversion of hellaswag / winogrande) are copied keeping their
paths in the repo. Either way the result is checked with `evalsets.check_mirror` (the layout and columns evaluate
reads) in a folder beside the target, then renamed into place, with a marker file that says where it came from.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from pipeline.core.paths import CONFIGS, repo_path, shown
from pipeline.core.strict import Key, build, load_yaml
from pipeline.evaluation import evalsets

CONFIG = CONFIGS / "mirrors.yaml"
MARKER = ".zh-align-mirror.json"
# (repo, filename in the repo, revision) -> the downloaded file on disk; huggingface_hub's by default.
Downloader = Callable[[str, str, str], Path]


@dataclass
class MirrorSource:
    repo: str
    revision: str
    files: dict[str, str | None]          # file in the repo -> its SHA256 (null: not pinned, recorded at first fetch)
    unpack: Literal["zip", "copy"] = "copy"
    licence: str = ""

    def check(self, key: Key) -> list[str]:
        problems = [] if self.files else [f"{key('files')} is empty; name the file(s) to download"]
        for name, digest in self.files.items():
            if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
                problems.append(f"{key('files')}: the sha256 of {name!r} is {digest!r}; give 64 lowercase hex "
                                f"digits, or null to record it at the first download")
        if self.unpack == "zip" and not all(n.endswith(".zip") for n in self.files):
            problems.append(f"{key('unpack')} is zip but {key('files')} names a file that is not a .zip")
        return problems


@dataclass
class MirrorsConfig:
    folder: str = ".cache/eval-mirrors"
    sources: dict[str, MirrorSource] = field(default_factory=dict)

    def check(self, key: Key) -> list[str]:
        return [f"{key('sources')}: no local layout for task {t!r}; mirrors are read for "
                f"{', '.join(evalsets.LAYOUTS)}" for t in self.sources if t not in evalsets.LAYOUTS]


def load(path: str | Path = CONFIG) -> MirrorsConfig:
    path = repo_path(path)
    return build(MirrorsConfig, load_yaml(path), shown(path))


def default_folder(cfg: MirrorsConfig, task: str) -> Path:
    return repo_path(cfg.folder) / task


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_download(repo: str, filename: str, revision: str) -> Path:
    """One file of a dataset repo through huggingface_hub (HF_ENDPOINT / HF_HOME as `apply_hub_env` set them)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset", revision=revision))


def _commit(path: Path) -> str | None:
    """The commit a file came from, when it sits in huggingface_hub's cache (…/snapshots/<commit>/<file>)."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def marker(folder: str | Path) -> dict | None:
    path = repo_path(folder) / MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def origin(made: dict) -> str:
    """`repo@commit` (or the revision when the commit is not known) of a marker."""
    return f"{made['repo']}@{made.get('commit') or made['revision']}"


def status(task: str, folder: str | Path, known: bool) -> tuple[str, str | None]:
    """(the dry run's line for a mirrored task, the problem a real run would meet or None)."""
    problem = evalsets.mirror_problem(task, folder)
    if problem is None:
        made = marker(folder)
        if made:
            return f"fetched by make mirrors ({origin(made)})", None
        return "mirror present", None
    if not repo_path(folder).exists():
        fix = "run make mirrors (make eval DRY_RUN=0 runs it first)" if known else \
            f"put the files there or point `mirrors.{task}` at a folder ({evalsets._expected(task)})"
        return f"missing: {fix}", problem
    return "present but unusable: " + problem, problem


def _safe_members(archive: zipfile.ZipFile, where: Path) -> list[zipfile.ZipInfo]:
    members = []
    for info in archive.infolist():
        parts = PurePosixPath(info.filename).parts
        if info.filename.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
            raise ValueError(f"{where}: member {info.filename!r} would land outside the mirror folder; refused")
        if parts and parts[0] != "__MACOSX":
            members.append(info)
    return members


def _layout_root(task: str, folder: Path) -> Path:
    """The folder holding the layout: the unpacked root, or a single folder the archive wrapped it in."""
    here = folder
    for _ in range(3):
        if evalsets.mirror_problem(task, here) is None:
            return here
        subs = [p for p in here.iterdir() if p.is_dir() and p.name != "__MACOSX"]
        if len(subs) != 1:
            break
        here = subs[0]
    return folder


@dataclass
class Fetched:
    task: str
    folder: Path
    repo: str
    revision: str
    commit: str | None
    files: dict[str, str]                      # file in the repo -> the SHA256 seen
    unpinned: list[str]                        # files whose SHA256 configs/mirrors.yaml does not pin yet

    def __str__(self) -> str:
        lines = [f"{self.task}: {self.repo}@{self.commit or self.revision} → {shown(self.folder)}"]
        lines += [f"  sha256 {name}: {digest}" + (" (NOT PINNED: pin it in configs/mirrors.yaml)"
                                                 if name in self.unpinned else " (matches the pin)")
                  for name, digest in self.files.items()]
        return "\n".join(lines)


def verify(name: str, path: Path, pinned: str | None) -> str:
    """The file's SHA256; a ValueError naming both values when a pinned one differs."""
    seen = sha256(path)
    if pinned is not None and seen != pinned:
        raise ValueError(f"{name} ({path}): SHA256 {seen} does not match the pinned {pinned} in configs/mirrors.yaml; "
                         f"the file changed or the download is corrupt — delete it from the hub cache and run "
                         f"make mirrors again, or (having checked the new release) pin the new value")
    return seen


def install(task: str, src: MirrorSource, downloaded: dict[str, Path], dest: Path) -> Fetched:
    """Check the downloaded files' SHA256, unpack or copy them beside `dest`, check the layout, rename into place."""
    seen = {name: verify(name, path, src.files[name]) for name, path in downloaded.items()}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        for name, path in downloaded.items():
            if src.unpack == "zip":
                try:
                    with zipfile.ZipFile(path) as archive:
                        archive.extractall(work, members=_safe_members(archive, path))
                except zipfile.BadZipFile as err:
                    raise ValueError(f"{name} ({path}) is not a zip archive: {err}") from err
            else:
                target = work / PurePosixPath(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        root = _layout_root(task, work)
        try:
            evalsets.check_mirror(task, root)
        except ValueError as err:
            raise ValueError(f"{task}: the files from {src.repo}@{src.revision} are not in the layout evaluate "
                             f"reads: {err}") from err
        commit = next((c for c in map(_commit, downloaded.values()) if c), None)
        (root / MARKER).write_text(json.dumps({
            "task": task, "repo": src.repo, "revision": src.revision, "commit": commit, "sha256": seen,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, ensure_ascii=False, indent=2),
            encoding="utf-8")
        old = dest.parent / f".{dest.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        root.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Fetched(task, dest, src.repo, src.revision, commit, seen,
                   [n for n in seen if src.files[n] is None])


def fetch(task: str, src: MirrorSource, dest: Path, download: Downloader = hub_download) -> Fetched:
    """Download every file of `src` (huggingface_hub caches and resumes them), then `install`."""
    downloaded = {}
    for name in src.files:
        try:
            downloaded[name] = Path(download(src.repo, name, src.revision))
        except Exception as err:  # network, auth, a missing file: said with the source and the fix
            raise RuntimeError(f"{task}: could not download {name} from {src.repo}@{src.revision}: "
                               f"{type(err).__name__}: {str(err).rstrip('.')}. Check the network or "
                               f"configs/hub.yaml's endpoint (HF_ENDPOINT), and that the repo still publishes that "
                               f"file at that revision") from err
    return install(task, src, downloaded, dest)
