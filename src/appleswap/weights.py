"""The weights registry: every model file the project can load, as data, and one lookup that never downloads.

Entries live in ``registry/*.toml`` (one file per stage), one table per weight::

    [pulid_flux]
    role = "PuLID-FLUX IDFormer + 20 ID cross-attentions"
    path = "pulid/pulid_flux_v0.9.1.safetensors"   # relative to the weights folder
    kind = "file"                                    # or "dir" (then `contains` lists files that must exist)
    licence = "Apache-2.0"
    source = "https://huggingface.co/guozinan/PuLID (file pulid_flux_v0.9.1.safetensors)"
    sha256 = ""                                      # checked by `appleswap weights check --verify` when known

The weights folder is ``--weights-dir``, else ``$APPLESWAP_HOME``, else ``~/.cache/appleswap``. One file can be
pointed at directly with ``$APPLESWAP_WEIGHT_<NAME>`` (e.g. ``APPLESWAP_WEIGHT_PULID_FLUX=/data/pulid.safetensors``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from importlib import resources
from pathlib import Path

import tomllib

from appleswap.cli_common import HelpFormatter, common_parser


class MissingWeightError(FileNotFoundError):
    """A weight file is not where the registry expects it; the message says where and how to get it."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    name: str
    role: str
    path: str  # relative to the weights folder
    licence: str
    source: str
    kind: str = "file"  # "file" or "dir"
    contains: tuple[str, ...] = ()  # for kind="dir": files that must be present
    sha256: str = ""
    size: int = 0  # bytes, 0 when unknown
    note: str = ""


@functools.lru_cache(maxsize=1)
def load_registry() -> dict[str, WeightSpec]:
    """All registry entries, by name, from every ``registry/*.toml`` shipped with the package."""
    specs: dict[str, WeightSpec] = {}
    for entry in sorted(resources.files("appleswap.registry").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".toml"):
            continue
        for name, table in tomllib.loads(entry.read_text()).items():
            if name in specs:
                raise ValueError(f"weights registry: {name!r} defined twice (second time in {entry.name})")
            table = dict(table)
            table["contains"] = tuple(table.get("contains", ()))
            specs[name] = WeightSpec(name=name, **table)
    return specs


def get_spec(name: str) -> WeightSpec:
    registry = load_registry()
    if name not in registry:
        raise KeyError(f"unknown weight {name!r}; known: {sorted(registry)}")
    return registry[name]


def weights_dir(explicit: str | Path | None = None) -> Path:
    """The weights folder: ``explicit`` (``--weights-dir``), else ``$APPLESWAP_HOME``, else ``~/.cache/appleswap``."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("APPLESWAP_HOME"):
        return Path(os.environ["APPLESWAP_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "appleswap"


def env_override_name(name: str) -> str:
    return f"APPLESWAP_WEIGHT_{name.upper()}"


def expected_path(name: str, root: str | Path | None = None) -> Path:
    """Where ``name`` should be: ``$APPLESWAP_WEIGHT_<NAME>`` if set, else ``<weights folder>/<path>``."""
    override = os.environ.get(env_override_name(name))
    if override:
        return Path(override).expanduser()
    return weights_dir(root) / get_spec(name).path


def _missing_parts(spec: WeightSpec, path: Path) -> list[str]:
    if spec.kind == "dir":
        if not path.is_dir():
            return [str(path) + "/"]
        return [str(path / f) for f in spec.contains if not (path / f).exists()]
    return [] if path.is_file() else [str(path)]


def locate(name: str, root: str | Path | None = None, *, explicit: str | Path | None = None) -> Path:
    """Path of weight ``name``, or :class:`MissingWeightError` naming the file and how to get it.

    ``explicit`` (a CLI flag or config value pointing at the file itself) wins over the registry location.
    """
    spec = get_spec(name)
    path = Path(explicit).expanduser() if explicit else expected_path(name, root)
    missing = _missing_parts(spec, path)
    if missing:
        raise MissingWeightError(missing_message(spec, missing))
    return path


def missing_message(spec: WeightSpec, missing: list[str]) -> str:
    shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
    return (
        f"missing weights '{spec.name}' ({spec.role}): {shown} not found.\n"
        f"  Get it from: {spec.source}\n"
        f"  Licence: {spec.licence}\n"
        f"  Put it at <weights folder>/{spec.path} (weights folder: --weights-dir or $APPLESWAP_HOME), "
        f"or point {env_override_name(spec.name)} at it."
        + (f"\n  Note: {spec.note}" if spec.note else "")
    )


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check(root: str | Path | None = None, *, verify: bool = False) -> list[dict[str, str]]:
    """One row per registry entry: name, status (present / missing / bad checksum), path, role, licence."""
    rows = []
    for spec in load_registry().values():
        path = expected_path(spec.name, root)
        missing = _missing_parts(spec, path)
        status = "missing" if missing else "present"
        if not missing and verify and spec.sha256 and spec.kind == "file":
            status = "present, sha256 ok" if sha256_of(path) == spec.sha256 else "BAD CHECKSUM"
        rows.append({"name": spec.name, "status": status, "path": str(path), "role": spec.role,
                     "licence": spec.licence, "source": spec.source})
    return rows


# ---- CLI: appleswap weights {check,list}
def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "weights", parents=[common_parser()], formatter_class=HelpFormatter,
        help="list the model weights appleswap can load and which are present",
        description="Show every weight file in the registry, where appleswap expects it, its licence and source.",
    )
    parser.add_argument("action", choices=["check", "list"], nargs="?", default="check",
                        help="check: present/missing per weight; list: where to get each one")
    parser.add_argument("--verify", action="store_true", help="also verify SHA-256 checksums where known (slow)")
    parser.set_defaults(func=run)


def run(args) -> int:
    rows = check(args.weights_dir, verify=args.verify)
    print(f"weights folder: {weights_dir(args.weights_dir)}")
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        if args.action == "check":
            print(f"  {row['name']:<{width}}  {row['status']:<8}  {row['path']}")
        else:
            print(f"  {row['name']:<{width}}  {row['role']}\n  {'':<{width}}  licence: {row['licence']}\n"
                  f"  {'':<{width}}  source: {row['source']}")
    present = sum(r["status"].startswith("present") for r in rows)
    print(f"{present} of {len(rows)} present")
    return 0
