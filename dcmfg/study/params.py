"""Notebook parameters: the check at the top of every notebook, and the parameter sets the runner passes.

A notebook's `parameters` cell declares its parameters as annotated assignments (`seeds: list = [0, 1]`);
`check_parameters` refuses a name the cell does not declare and a value of the wrong type before any work.

A parameter set is a YAML file with a `common:` mapping (passed to every notebook that declares the name) and a
`notebooks:` mapping of per-notebook values; named sets resolve to configs/study-<name>.yaml. An edition of the
book that holds some chapters only lists them under `chapters:` (default: every notebook) and may name its own
front page under `book: {root: FILE-STEM, title: ...}` (a Markdown file in book/).
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path

import yaml

from dcmfg.errors import ConfigError, DcmfgError
from dcmfg.study.repo import notebook_names, repo_dir


# --------------------------------------------------------------------------------------------- in the notebook
class ParameterError(DcmfgError):
    """A notebook parameter that does not exist or has the wrong type; shown as one line in the notebook."""

    def _render_traceback_(self):  # IPython (and so papermill) show this instead of a traceback
        return [f"ParameterError: {self}"]


def _accepts(annotation, value) -> tuple[bool, object]:
    """Whether `value` fits `annotation` (list, dict, str, int, float, bool and unions of them with None); a string
    given for a non-string parameter (papermill's `-p seeds "[0, 1]"`) is read as YAML first."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
    options = tuple(typing.get_origin(o) or o for o in options)
    if isinstance(value, str) and str not in options:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return False, value
    for want in options:
        if want is type(None) and value is None:
            return True, value
        if want is bool and isinstance(value, bool):
            return True, value
        if want is int and isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value  # an int stays an int: split sizes are counts when integers, fractions when floats
        if want in (str, list, dict) and isinstance(value, want):
            return True, value
    return False, value


def _type_name(annotation) -> str:
    return re.sub(r"\btyping\.|<class '(\w+)'>", r"\1", str(annotation)).replace("NoneType", "None")


def check_parameters(namespace: dict, before: set) -> dict:
    """The notebook's parameters as declared by its `parameters` cell (annotated assignments), with the values in
    `namespace` (papermill's injected cell included), types checked and written back. A name set by the injected
    cell that the notebook does not declare is refused: papermill itself passes unknown names silently."""
    declared = dict(namespace.get("__annotations__", {}))
    new = {n for n in set(namespace) - set(before)
           if not n.startswith("_") and not isinstance(namespace[n], types.ModuleType)}  # imports are not parameters
    unknown = sorted(new - set(declared))
    if unknown:
        raise ParameterError(f"unknown parameter {unknown[0]!r}; this notebook's parameters are: {', '.join(declared)}")
    values = {}
    for name, annotation in declared.items():
        if isinstance(annotation, str):  # a quoted annotation ("Optional[float]") or postponed annotations
            annotation = declared[name] = eval(annotation, {**vars(typing), **namespace})
        ok, value = _accepts(annotation, namespace.get(name))
        if not ok:
            raise ParameterError(
                f"parameter {name!r} must be {_type_name(annotation)}, got {namespace.get(name)!r}"
                + (f" (e.g. -p {name} '[0, 1]')" if list in (typing.get_args(annotation) or (annotation,)) else ""))
        namespace[name] = values[name] = value
    return values


# --------------------------------------------------------------------------------------------- parameter sets
def resolve_params_path(spec: str | os.PathLike | None) -> Path:
    """`quick` -> configs/study-quick.yaml; an existing file path stays as it is; None -> full."""
    spec = "full" if spec in (None, "") else str(spec)
    if re.fullmatch(r"[A-Za-z0-9_-]+", spec) and not spec.endswith((".yaml", ".yml")):
        path = repo_dir() / "configs" / f"study-{spec}.yaml"
        if not path.is_file():
            known = sorted(p.stem.removeprefix("study-") for p in (repo_dir() / "configs").glob("study-*.yaml"))
            raise ConfigError(f"no study parameter set {spec!r} ({path} missing); known sets: {', '.join(known)}")
        return path
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{path}: study parameter file not found")
    return path


def load_params(path: str | os.PathLike) -> dict:
    """Read and check a parameter set: {name, common: {...}, notebooks: {notebook: {...}}}."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'common' and 'notebooks', got {type(raw).__name__}")
    unknown = set(raw) - {"name", "description", "common", "notebooks", "chapters", "book"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)} (allowed: name, description, common, "
                          f"notebooks, chapters, book)")
    common = raw.get("common") or {}
    notebooks = raw.get("notebooks") or {}
    if not isinstance(common, dict) or not isinstance(notebooks, dict):
        raise ConfigError(f"{path}: 'common' and 'notebooks' must be mappings")
    bad = sorted(set(notebooks) - set(notebook_names()))
    if bad:
        raise ConfigError(f"{path}: unknown notebooks {bad}; the study has {notebook_names()}")
    for nb, values in notebooks.items():
        if not isinstance(values or {}, dict):
            raise ConfigError(f"{path}: notebooks.{nb} must be a mapping of parameters")
    chapters = raw.get("chapters") or notebook_names()
    if not isinstance(chapters, list) or sorted(set(map(str, chapters)) - set(notebook_names())):
        raise ConfigError(f"{path}: chapters must list notebooks of the study ({', '.join(notebook_names())}), got "
                          f"{chapters!r}")
    book = raw.get("book") or {}
    if not isinstance(book, dict) or set(book) - {"root", "title"}:
        raise ConfigError(f"{path}: book must be a mapping with root (a Markdown file in book/) and title, got {book!r}")
    if book.get("root") and not (repo_dir() / "book" / f"{book['root']}.md").is_file():
        raise ConfigError(f"{path}: book.root {book['root']!r}: no book/{book['root']}.md")
    return {
        "name": str(raw.get("name") or path.stem.removeprefix("study-")),
        "description": str(raw.get("description") or ""),
        "common": common,
        "notebooks": {k: dict(v or {}) for k, v in notebooks.items()},
        "chapters": [c for c in notebook_names() if c in set(map(str, chapters))],  # run in the study's order
        "book": {k: str(v) for k, v in book.items()},
        "source": str(path),
    }


def notebook_parameters(params: dict, notebook: str, declared: dict) -> dict:
    """The values papermill injects into one notebook: the common ones it declares, then its own section.

    A per-notebook key the notebook does not declare is a typo in the parameter file: refuse it.
    """
    own = params["notebooks"].get(notebook, {})
    unknown = sorted(set(own) - set(declared))
    if unknown:
        raise ConfigError(
            f"{params.get('source', 'parameters')}: notebooks.{notebook} sets {unknown}, which the notebook does not "
            f"declare (it declares {sorted(declared)})"
        )
    values = {k: v for k, v in params["common"].items() if k in declared}
    values.update(own)
    return values
