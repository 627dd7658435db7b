"""The evaluation manifest: a JSON list or a CSV of output, source, motion[, target] rows -> entries.

Relative paths resolve against the manifest's folder; a manifest that cannot be used is one ManifestError.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

MANIFEST_COLUMNS = ("output", "source", "motion", "target")
REQUIRED_COLUMNS = ("output", "source")


class ManifestError(ValueError):
    """The manifest itself cannot be used (missing, unparsable, or rows without required fields)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One video to evaluate; paths already resolved. motion: a canonical name, a trajectory
    JSON path, or None (no camera judgement, e.g. a static multi-view pair)."""

    output: str
    source: str
    motion: str | None = None
    target: str | None = None


def _resolve(value: str, base: str) -> str:
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _motion_spec(value: str, base: str) -> str:
    """A canonical motion name as written, or a trajectory JSON path resolved against `base`."""
    resolved = _resolve(value, base)
    return resolved if value.lower().endswith(".json") or os.path.isfile(resolved) else value


def entries_from_rows(rows: Iterable[Mapping[str, Any]], base: str = ".") -> list[Entry]:
    """Manifest rows (dicts with output, source, optional motion and target) -> entries.

    Relative paths resolve against `base`. Raises ManifestError for a row that is not an
    object, lacks a required field, or has a field this format does not know.
    """
    entries = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ManifestError(f"row {i} is a {type(row).__name__}, expected an object with the fields "
                                f"{', '.join(MANIFEST_COLUMNS)}")
        values = {k: ("" if v is None else str(v).strip()) for k, v in row.items()}
        missing = [k for k in REQUIRED_COLUMNS if not values.get(k)]
        unknown = sorted(set(values) - set(MANIFEST_COLUMNS))
        if missing or unknown:
            raise ManifestError(f"row {i} lacks {missing} or has unknown fields {unknown}; the fields are "
                                f"{', '.join(MANIFEST_COLUMNS)} (output and source required)")
        entries.append(Entry(
            output=_resolve(values["output"], base), source=_resolve(values["source"], base),
            motion=_motion_spec(values["motion"], base) if values.get("motion") else None,
            target=_resolve(values["target"], base) if values.get("target") else None))
    return entries


def read_rows(path: str | os.PathLike, columns: tuple[str, ...] = MANIFEST_COLUMNS,
              required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[dict[str, Any]]:
    """The rows of a JSON list of objects or of a CSV with a header row naming at least
    ``required`` (the format's fields: ``columns``); at least one row. Rows are not checked
    field by field (the caller's reader does that). Also read by ``sampling.batch``."""
    path = os.fspath(path)
    fields = ", ".join(columns)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror or e}") from e
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {path} is not text (a binary file?); give a JSON list or a CSV of "
                            f"{fields} rows") from None
    if "\0" in text:
        raise ManifestError(f"manifest {path} holds NUL bytes (a binary file?); give a JSON list or a CSV of "
                            f"{fields} rows")
    if path.lower().endswith(".json") or text.lstrip().startswith(("[", "{")):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest {path} is not valid JSON: {e}") from e
        if not isinstance(rows, list):
            raise ManifestError(f"manifest {path} must hold a JSON list of rows, got a {type(rows).__name__}")
    else:
        reader = csv.DictReader(text.splitlines())
        try:
            if not reader.fieldnames or not set(required) <= {c.strip() for c in reader.fieldnames}:
                raise ManifestError(f"CSV manifest {path} needs a header row naming at least "
                                    f"{', '.join(required)} (columns: {fields})")
            rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
        except csv.Error as e:
            raise ManifestError(f"CSV manifest {path} cannot be parsed (line {reader.line_num}): {e}") from None
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    return rows


def read_manifest(path: str | os.PathLike) -> list[Entry]:
    """A JSON list of objects or a CSV with a header row -> entries (paths relative to the manifest's folder)."""
    path = os.fspath(path)
    rows = read_rows(path)
    try:
        return entries_from_rows(rows, os.path.dirname(os.path.abspath(path)))
    except ManifestError as e:
        raise ManifestError(f"manifest {path}: {e}") from e
