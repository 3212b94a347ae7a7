"""What a benchmark record pins: the code (full commit, dirty flag, a hash of the uncommitted diff), the
command line, library versions, the CPU and its instruction set, the seed and the input files' sha256.

A record is evidence only when someone else can re-run what made it. So the state of the tree is read when
a run begins (the code it measures is loaded then), and a record is refused a place in the repository's
`benchmarks/results/` when that tree was dirty, unless the run says `--allow-dirty` (then it is marked).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

LIBRARIES = ("torch", "transformers", "tokenizers", "gguf", "safetensors", "numpy", "llguidance", "llama_cpp_python")
"""Versions kept in every record, where installed (read from package metadata: nothing is imported)."""

CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "sve")
"""The instruction-set flags the kernels choose by (the rest of /proc/cpuinfo's list says nothing about speed here)."""


class DirtyTreeError(ValueError):
    """A record meant for the repository's results from a tree with uncommitted changes."""


@dataclass
class GitState:
    commit: str = "unknown"
    """The full hash of HEAD ("unknown" outside a git checkout)."""
    dirty: bool | None = None
    """Whether tracked or untracked (not ignored) files differ from HEAD; None outside a checkout."""
    diff_sha256: str | None = None
    """sha256 of the uncommitted diff and untracked files, when dirty: two runs on the same edit match."""
    changed: list[str] = field(default_factory=list)
    """The paths that differ (the first 20), when dirty."""

    def to_dict(self) -> dict:
        out = {"commit": self.commit, "dirty": self.dirty}
        if self.dirty:
            out.update(diff_sha256=self.diff_sha256, changed_files=self.changed)
        return out


def git_state(root: Path = REPO_ROOT) -> GitState:
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return GitState()
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all", strip=False)
    if status is None:                   # a commit but no status: cannot say the tree is clean
        return GitState(commit, None)
    entries = _porcelain_entries(status)
    if not entries:
        return GitState(commit, False)
    digest = hashlib.sha256((_git(root, "diff", "HEAD", "--binary", strip=False) or "").encode())
    for code, path in entries:
        if code == "??":                 # untracked files: their names and contents
            digest.update(path.encode())
            if (root / path).is_file():
                digest.update((root / path).read_bytes())
    return GitState(commit, True, digest.hexdigest(), [path for _, path in entries][:20])


def _porcelain_entries(status: str) -> list[tuple[str, str]]:
    """(status code, path) from `git status --porcelain -z` (paths unquoted; a rename's source skipped)."""
    fields, out, i = status.split("\0"), [], 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) > 3:
            out.append((entry[:2], entry[3:]))
            if entry[0] in "RC":          # a rename or copy: its source path follows as a field of its own
                i += 1
    return out


def _git(root: Path, *args: str, strip: bool = True) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() if strip else out.stdout


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it again: a console script by its name, a script by its path from the
    repository root, arguments shell-quoted."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        first = Path(argv[0])
        if first.name == "effinfer" or first.resolve() == REPO_ROOT / "effinfer" / "cli.py":
            argv[0] = "effinfer"      # the console script, or `python -m effinfer.cli`: the same main
        elif first.suffix == ".py":
            try:
                argv[0] = str(first.resolve().relative_to(REPO_ROOT))
            except ValueError:
                pass
            argv.insert(0, "python")
    return shlex.join(argv)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def cpu() -> dict:
    name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name, "machine": platform.machine(), "num_cpus": os.cpu_count(),
            "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def llamacpp_build(binary: str | os.PathLike) -> str | None:
    """The version line a llama.cpp tool prints (`version: 0.5.0-dev (build 1, commit 0c1e570)`), or None."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((line.removeprefix("version:").strip() for line in (out.stdout + out.stderr).splitlines()
                 if line.startswith("version:")), None)


_digests: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder (its files' names and digests, in order: a Hugging Face model folder)."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{child.relative_to(path)}\0{file_sha256(child)}\n".encode())
        return digest.hexdigest()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def describe_inputs(inputs: dict[str, str | os.PathLike | None]) -> dict:
    """{role: {"path", "sha256"}} for each input that names an existing file or folder."""
    out = {}
    for role, path in inputs.items():
        if path and Path(path).exists():
            out[role] = {"path": str(path), "sha256": file_sha256(path)}
    return out


@dataclass
class RunProvenance:
    """Taken when a run begins (before the code it measures runs); the record it writes carries it."""

    git: GitState
    command: str
    started: str

    @classmethod
    def begin(cls, result_file: str | os.PathLike | None = None, allow_dirty: bool = False) -> "RunProvenance":
        """Refuses (DirtyTreeError) a record headed for the repository's results from a dirty tree, unless
        `allow_dirty`: said before a long run starts, not after it."""
        run = cls(git_state(), command_line(), datetime.now(timezone.utc).isoformat(timespec="seconds"))
        if run.git.dirty is not False and not allow_dirty and result_file and in_results(result_file):
            what = (f"the tree has uncommitted changes ({', '.join(run.git.changed[:5])})" if run.git.dirty
                    else "git cannot say whether the tree is clean")
            raise DirtyTreeError(f"{what}; a record in {RESULTS_DIR} must name the code it measured: commit first, "
                                 "or pass --allow-dirty (the record says so)")
        return run

    def environment(self, seed: int | None = None, inputs: dict | None = None) -> dict:
        import torch

        env = {**self.git.to_dict(), "command": self.command, "date": self.started, **cpu(),
               "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "versions": versions()}
        if seed is not None:
            env["seed"] = seed
        described = describe_inputs(inputs or {})
        if described:
            env["inputs"] = described
        return env


def add_allow_dirty_arg(parser) -> None:
    parser.add_argument("--allow-dirty", action="store_true",
                        help="write a record into benchmarks/results/ from a tree with uncommitted changes (marked "
                             "dirty in the record; without it such a run is refused before it starts)")


def in_results(path: str | os.PathLike) -> bool:
    return Path(path).resolve().is_relative_to(RESULTS_DIR)
