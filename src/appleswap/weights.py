"""The weights registry: every model file the project can load, as data, and one lookup that never downloads.

Entries live in ``registry/*.toml`` (one file per stage), one table per weight::

    [pulid_flux]
    role = "PuLID-FLUX IDFormer + 20 ID cross-attentions"
    path = "pulid/pulid_flux_v0.9.1.safetensors"   # relative to the weights folder
    kind = "file"                                    # or "dir" (then `contains` lists files that must exist)
    licence = "Apache-2.0"
    source = "https://huggingface.co/guozinan/PuLID (file pulid_flux_v0.9.1.safetensors)"
    sha256 = ""                                      # checked by `weights check --verify` and `weights download`
    hf_repo = "guozinan/PuLID"                       # optional: where `appleswap weights download` fetches it
    hf_files = ["pulid_flux_v0.9.1.safetensors"]     # the file in that repo (kind "dir": the patterns to fetch)

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
    hf_repo: str = ""  # Hugging Face repo `appleswap weights download` fetches it from ("" = manual download)
    hf_files: tuple[str, ...] = ()  # kind "file": the one file in the repo; kind "dir": patterns (all when empty)
    hf_repo_type: str = "model"  # or "dataset"
    hf_revision: str = ""  # a commit or tag (default: the main branch)

    @property
    def non_commercial(self) -> bool:
        """Whether the licence restricts use (non-commercial / research only): download asks to accept it."""
        text = self.licence.lower()
        return any(word in text for word in ("non-commercial", "noncommercial", "research only", "research use"))


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
            table["hf_files"] = tuple(table.get("hf_files", ()))
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


# ---- opt-in download (`appleswap weights download`): nothing is ever fetched at run time
class LicenceNotAccepted(ValueError):
    """A non-commercial licence was not accepted: nothing was downloaded."""


def _install(staged: Path, destination: Path) -> None:
    """Move a finished download into place (a file, or every file of a folder), replacing nothing partial."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if staged.is_file():
        os.replace(staged, destination)
        return
    for item in sorted(p for p in staged.rglob("*") if p.is_file() and ".cache" not in p.relative_to(staged).parts):
        target = destination / item.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(item, target)


def fetch(spec: WeightSpec, root: str | Path | None = None) -> Path:
    """Download one registry entry from its Hugging Face repo into the weights folder, checking its SHA-256 where
    the registry knows it; the file reaches its place only when complete and verified."""
    import shutil

    from huggingface_hub import hf_hub_download, snapshot_download

    if not spec.hf_repo:
        raise ValueError(f"'{spec.name}' has no Hugging Face source; get it by hand: {spec.source}")
    destination = expected_path(spec.name, root)
    staging = weights_dir(root) / ".download" / spec.name
    common = {"repo_type": spec.hf_repo_type, "revision": spec.hf_revision or None, "local_dir": str(staging)}
    try:
        try:
            staged = Path(hf_hub_download(spec.hf_repo, spec.hf_files[0], **common) if spec.kind == "file" else
                          snapshot_download(spec.hf_repo, allow_patterns=list(spec.hf_files) or None, **common))
        except Exception as error:  # huggingface_hub's HTTP, gating and offline errors
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"'{spec.name}': download from huggingface.co/{spec.hf_repo} failed "
                             f"({type(error).__name__}: {first}); a gated repo needs its licence accepted on the "
                             "website and `hf auth login`") from error
        digest = sha256_of(staged) if spec.kind == "file" and spec.sha256 else spec.sha256
        if digest != spec.sha256:
            raise ValueError(f"'{spec.name}': SHA-256 of the download is {digest}, the registry expects "
                             f"{spec.sha256}; not installed (a changed or corrupt file upstream)")
        _install(staged, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    missing = _missing_parts(spec, destination)
    if missing:
        raise MissingWeightError(missing_message(spec, missing))
    return destination


def download(names: list[str], root: str | Path | None = None, *, accept_licence: bool = False,
             ask=input, say=print) -> list[Path]:
    """``appleswap weights download [NAME...]`` (no names: every missing entry that has a Hugging Face source).

    Prints each entry's licence first; non-commercial ones must be accepted (``ask``, or ``accept_licence`` for
    scripts) before anything is fetched. Entries already present are skipped; entries without a Hugging Face
    source are listed with where to get them."""
    registry = load_registry()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown weight(s) {unknown}; known: {sorted(registry)}")
    chosen = [registry[n] for n in names] if names else [s for s in registry.values() if s.hf_repo]
    manual = [s for s in chosen if not s.hf_repo]
    todo = [s for s in chosen if s.hf_repo and _missing_parts(s, expected_path(s.name, root))]
    for spec in manual:
        say(f"  {spec.name}: no Hugging Face source; get it by hand: {spec.source}")
    if not todo:
        say("nothing to download: every chosen weight is present" if not manual else "nothing else to download")
        return []
    say("to download (licences first):")
    for spec in todo:
        mark = "  [non-commercial]" if spec.non_commercial else ""
        say(f"  {spec.name}: {spec.hf_repo} -> {expected_path(spec.name, root)}\n    licence: {spec.licence}{mark}")
    restricted = [s.name for s in todo if s.non_commercial]
    if restricted and not accept_licence:
        answer = ask(f"{', '.join(restricted)} may only be used non-commercially. Accept these licences? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise LicenceNotAccepted("licence not accepted; nothing was downloaded (--accept-licence to accept)")
    written = []
    for spec in todo:
        say(f"downloading {spec.name} from huggingface.co/{spec.hf_repo} ...")
        written.append(fetch(spec, root))
        say(f"  {spec.name}: {written[-1]}" + (" (sha256 ok)" if spec.sha256 and spec.kind == "file" else ""))
    return written


# ---- CLI: appleswap weights {check,list,download}
def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "weights", parents=[common_parser()], formatter_class=HelpFormatter,
        help="list the model weights appleswap can load, which are present, and download them",
        description="Show every weight file in the registry, where appleswap expects it, its licence and source; "
        "`download` fetches the ones with a Hugging Face source (opt-in; gated repos need `hf auth login` after "
        "accepting their licence on the website).",
        epilog="examples:\n  appleswap weights check\n  appleswap weights download pulid_flux eva02_clip_l_336\n"
        "  appleswap weights download --accept-licence      # every missing weight, for scripts",
    )
    parser.add_argument("action", choices=["check", "list", "download"], nargs="?", default="check",
                        help="check: present/missing per weight; list: where to get each one; download: fetch them")
    parser.add_argument("names", nargs="*", metavar="NAME", help="download: these registry entries (default: all)")
    parser.add_argument("--verify", action="store_true", help="also verify SHA-256 checksums where known (slow)")
    parser.add_argument("-y", "--yes", "--accept-licence", dest="accept_licence", action="store_true",
                        help="download: accept the non-commercial licences without asking")
    parser.set_defaults(func=run)


def run(args) -> int:
    import sys

    if args.action == "download":
        interactive = sys.stdin.isatty()

        def ask(question: str) -> str:
            if not interactive:
                raise LicenceNotAccepted("non-commercial licences must be accepted: run in a terminal or pass "
                                         "--accept-licence; nothing was downloaded")
            return input(question)

        download(args.names, args.weights_dir, accept_licence=args.accept_licence, ask=ask)
        return 0
    if args.names:
        raise ValueError(f"weights {args.action}: takes no names (did you mean `weights download`?)")
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
