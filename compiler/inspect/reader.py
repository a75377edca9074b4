"""Loading and validating a graph dump (``dump_dir/<tag>/manifest.json`` + the stored graph files).

Only the dump directory is read: nothing here imports model code or executes the stored Python,
so a dump copied from another machine can be inspected anywhere. Keys that later compiler
features add (``passes``, ``capture``, ``counters.pass_matches``, more timings) are read when
present and treated as "none" when absent.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"


class DumpError(Exception):
    """A problem with the user's input (path, tag, pass, piece, stage): reported as one line."""


@dataclass
class PassEntry:
    name: str
    matches: int | None
    file: str | None
    before: str | None = None  # optional explicit "graph before this pass" file


@dataclass
class Tag:
    name: str
    directory: str
    manifest: dict[str, Any]

    # ---- plain manifest facts (missing keys read as "none") ------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config") or {}

    @property
    def backend(self) -> str | None:
        return self.manifest.get("backend") or self.config.get("backend")

    @property
    def cache(self) -> str:
        return str(self.manifest.get("cache") or "off")

    @property
    def timings(self) -> dict[str, float]:
        timings = dict(self.manifest.get("timings_s") or {})
        capture = self.capture
        if capture and capture.get("capture_s") is not None and "capture_s" not in timings:
            timings["capture_s"] = capture["capture_s"]
        return timings

    @property
    def counters(self) -> dict[str, Any]:
        return dict(self.manifest.get("counters") or {})

    @property
    def capture(self) -> dict[str, Any] | None:
        capture = self.manifest.get("capture")
        return capture if isinstance(capture, dict) and capture else None

    @property
    def pieces(self) -> list[dict[str, Any]]:
        return sorted(self.manifest.get("pieces") or [], key=lambda p: p.get("index", 0))

    @property
    def passes(self) -> list[PassEntry]:
        out = []
        for entry in self.manifest.get("passes") or []:
            if isinstance(entry, str):
                entry = {"name": entry}
            name = str(entry.get("name"))
            out.append(PassEntry(name, entry.get("matches"), entry.get("file"), entry.get("before")))
        return out

    @property
    def pass_matches(self) -> dict[str, int]:
        """Matches per pass: the pass entries' counts, else the counters' ``pass_matches``."""
        matches = {k: v for k, v in (self.counters.get("pass_matches") or {}).items()}
        for entry in self.passes:
            if entry.matches is not None:
                matches[entry.name] = entry.matches
        return matches

    @property
    def splitting_ops(self) -> list[str]:
        """The config's splitting ops, else the ops found in pieces flagged ``is_splitting_op``."""
        ops = list(self.config.get("splitting_ops") or [])
        if not ops and "splitting_ops" not in self.config:
            for piece in self.pieces:
                if piece.get("is_splitting_op"):
                    ops += [op for op in piece.get("op_counts", {}) if op != "getitem" and op not in ops]
        return ops

    def is_splitting_op(self, op: str) -> bool:
        base = op.split(".")[0]
        return op in self.splitting_ops or base in self.splitting_ops

    # ---- files ------------------------------------------------------------------------------
    def path(self, file_name: str) -> str:
        return os.path.join(self.directory, file_name)

    def piece(self, index: int) -> dict[str, Any]:
        for piece in self.pieces:
            if piece.get("index") == index:
                return piece
        known = ", ".join(str(p.get("index")) for p in self.pieces) or "none"
        raise DumpError(f"tag {self.name!r} has no piece {index} (pieces: {known})")

    def pass_entry(self, name: str) -> PassEntry:
        for entry in self.passes:
            if entry.name == name:
                return entry
        # A pass whose after-file exists although the manifest does not list it (older writers).
        file_name = self.manifest.get("files", {}).get(f"after_{name}")
        if file_name or os.path.exists(self.path(f"after_{name}.py")):
            return PassEntry(name, self.pass_matches.get(name), file_name or f"after_{name}.py")
        known = ", ".join(e.name for e in self.passes) or "none recorded in this dump"
        raise DumpError(f"tag {self.name!r} has no pass {name!r} (passes: {known})")

    def stages(self) -> list[str]:
        out = ["dynamo"] if self._exists("dynamo.py") else []
        out += [f"after:{e.name}" for e in self.passes]
        out += [f"piece:{p['index']}" for p in self.pieces]
        return out

    def _exists(self, file_name: str) -> bool:
        return os.path.isfile(self.path(file_name))

    def stage_file(self, stage: str) -> str:
        """File name for ``dynamo``, ``after:PASS`` or ``piece:N``; a clear error otherwise."""
        if stage == "dynamo":
            file_name = self.manifest.get("files", {}).get("dynamo", "dynamo.py")
        elif stage.startswith("after:"):
            entry = self.pass_entry(stage[len("after:"):])
            file_name = entry.file or f"after_{entry.name}.py"
        elif stage.startswith("piece:"):
            try:
                index = int(stage[len("piece:"):])
            except ValueError:
                raise DumpError(f"bad stage {stage!r}: piece:N needs a number") from None
            file_name = self.piece(index).get("file") or f"piece_{index}.py"
        else:
            raise DumpError(f"unknown stage {stage!r}; stages of tag {self.name!r}: {', '.join(self.stages())}")
        if not self._exists(file_name):
            raise DumpError(f"stage {stage!r} of tag {self.name!r}: file {file_name} is missing from the dump")
        return file_name

    def stage_before_pass(self, name: str) -> str:
        """The stage holding the graph a pass started from: the previous pass's output, else Dynamo's."""
        entry = self.pass_entry(name)
        if entry.before:
            return f"file:{entry.before}"
        names = [e.name for e in self.passes]
        if name in names and names.index(name) > 0:
            return f"after:{names[names.index(name) - 1]}"
        return "dynamo"

    def read_stage(self, stage: str) -> tuple[str, str]:
        """(file name, source) of a stage; ``file:NAME`` reads a named file of the tag directory."""
        if stage.startswith("file:"):
            file_name = stage[len("file:"):]
            if not self._exists(file_name):
                raise DumpError(f"tag {self.name!r}: file {file_name} is missing from the dump")
        else:
            file_name = self.stage_file(stage)
        with open(self.path(file_name), encoding="utf-8") as f:
            return file_name, f.read()

    def pre_split_stage(self) -> str | None:
        """The graph that was split into pieces: Dynamo's when the passes ran on the pieces (as
        graphmode's compiler does, manifest ``passes_stage: "pieces"``), else the last pass's output."""
        if self.manifest.get("passes_stage") == "pieces":
            return "dynamo" if self._exists("dynamo.py") else None
        for entry in reversed(self.passes):
            if entry.file and self._exists(entry.file):
                return f"after:{entry.name}"
        return "dynamo" if self._exists("dynamo.py") else None


@dataclass
class Dump:
    path: str
    tags: dict[str, Tag] = field(default_factory=dict)

    def tag(self, name: str) -> Tag:
        if name not in self.tags:
            raise DumpError(f"unknown tag {name!r} in {self.path} (tags: {', '.join(self.tags)})")
        return self.tags[name]


def _load_manifest(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise DumpError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DumpError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(manifest, dict):
        raise DumpError(f"{path} is not a graphmode manifest (expected a JSON object)")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_FORMAT_VERSIONS))
        raise DumpError(f"{path} has dump format_version {version!r}; this inspector reads version {supported} "
                        f"(use the graphmode version that wrote the dump)")
    return manifest


def load_dump(path: str) -> Dump:
    """Read every tag of a dump directory (or a single ``<tag>/`` directory)."""
    if not os.path.exists(path):
        raise DumpError(f"no such directory: {path}")
    if not os.path.isdir(path):
        raise DumpError(f"{path} is not a directory (give the dump_dir the compiler wrote)")
    dump = Dump(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):  # pointed at one tag's directory
        manifest = _load_manifest(os.path.join(path, MANIFEST))
        name = str(manifest.get("tag") or os.path.basename(os.path.normpath(path)))
        dump.tags[name] = Tag(name, path, manifest)
        return dump
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise DumpError(f"cannot list {path}: {e.strerror}") from None
    for entry in entries:
        manifest_path = os.path.join(path, entry, MANIFEST)
        if os.path.isfile(manifest_path):
            manifest = _load_manifest(manifest_path)
            dump.tags[entry] = Tag(entry, os.path.join(path, entry), manifest)
    if not dump.tags:
        raise DumpError(f"{path} is not a graphmode dump: no <tag>/{MANIFEST} inside "
                        f"(set CompilationConfig(dump_dir=...) and run the model once)")
    return dump
