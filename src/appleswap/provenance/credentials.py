"""Signed C2PA content credentials (``c2pa-python``): sign every output, read and validate them in ``verify``.

The manifest says the picture is AI-generated in C2PA's terms. A swap edits an existing photo, so, as the C2PA
specification asks for a derived asset, the first action is ``c2pa.opened`` on the target photo (added as the
``parentOf`` ingredient, with its own credentials if it had any) and the second is ``c2pa.edited`` with the IPTC
digital source type ``compositeWithTrainedAlgorithmicMedia`` ("trained algorithmic media composited with other
media, e.g. inpainting": a generated face pasted into the photo). Without a parent file the action is
``c2pa.created`` with the same source type. Tool, version and model are the action's ``softwareAgent`` and
parameters; the full provenance record is the ``appleswap.provenance`` assertion.

Signing key: the user's (``--c2pa-key`` / ``--c2pa-cert``, or ``$APPLESWAP_C2PA_KEY`` / ``$APPLESWAP_C2PA_CERT``),
else a local one made on first use: a self-signed "appleswap local" CA and a signing certificate it issued (C2PA
refuses a self-signed leaf), cached in the cache folder (``$APPLESWAP_CACHE/c2pa``, never the weights folder).
``verify`` reports such a manifest as intact but signed by an untrusted local key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

from appleswap import __version__
from appleswap.files import atomic_path, cache_dir

log = logging.getLogger(__name__)
C2PA_MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
             ".mp4": "video/mp4", ".mov": "video/quicktime"}
COMPOSITE_AI = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
RECORD_ASSERTION = "appleswap.provenance"
LOCAL_ORGANISATION = "appleswap local (self-signed)"
KEY_ENV, CERT_ENV = "APPLESWAP_C2PA_KEY", "APPLESWAP_C2PA_CERT"
UNTRUSTED_CODES = {"signingCredential.untrusted"}  # only says no trust list vouches for the signer


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A PEM certificate chain (signer first) and its PEM private key; ``local``: made here, self-signed."""

    cert_chain: bytes
    private_key: bytes
    algorithm: str
    local: bool = False


_configured: Credentials | None = None


def credentials_dir() -> Path:
    """Where the local signing key lives: ``$APPLESWAP_CACHE/c2pa``, else the platform cache folder's."""
    return cache_dir("c2pa")


def _algorithm(private_key: bytes, source: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(private_key, password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{source}: not an unencrypted PEM private key ({error})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sizes = {256: "es256", 384: "es384", 521: "es512"}
        if key.curve.key_size not in sizes:
            raise ValueError(f"{source}: EC curve {key.curve.name} is not one C2PA signs with (P-256/384/521)")
        return sizes[key.curve.key_size]
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ValueError(f"{source}: unsupported key type {type(key).__name__} (use EC, RSA or Ed25519)")


def load_credentials(key: str | Path, cert: str | Path) -> Credentials:
    """The user's signing key and certificate chain (PEM files); ValueError naming the file when unusable."""
    paths = {"--c2pa-key": Path(key).expanduser(), "--c2pa-cert": Path(cert).expanduser()}
    for flag, path in paths.items():
        if not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    private_key, chain = paths["--c2pa-key"].read_bytes(), paths["--c2pa-cert"].read_bytes()
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise ValueError(f"--c2pa-cert {paths['--c2pa-cert']}: no PEM certificate in it")
    return Credentials(chain, private_key, _algorithm(private_key, f"--c2pa-key {paths['--c2pa-key']}"))


def configure_credentials(key: str | Path | None = None, cert: str | Path | None = None) -> Credentials:
    """Choose the signing key for this process (the commands call it with their flags): the given files, else
    ``$APPLESWAP_C2PA_KEY`` / ``$APPLESWAP_C2PA_CERT``, else the local self-signed key."""
    global _configured
    key = key or os.environ.get(KEY_ENV)
    cert = cert or os.environ.get(CERT_ENV)
    if bool(key) != bool(cert):
        raise ValueError("give both --c2pa-key and --c2pa-cert (or neither, for the local self-signed key)")
    _configured = load_credentials(key, cert) if key else local_credentials()
    return _configured


def default_credentials() -> Credentials:
    """The key chosen by :func:`configure_credentials` (configured on first use from the environment)."""
    return _configured if _configured is not None else configure_credentials()


def local_credentials(folder: str | Path | None = None) -> Credentials:
    """The local self-signed credentials, made (and cached in ``folder``) on first use."""
    folder = Path(folder) if folder is not None else credentials_dir()
    key_path, cert_path = folder / "signer.key.pem", folder / "signer.chain.pem"
    if not (key_path.is_file() and cert_path.is_file()):
        chain, private_key = _make_local_chain()
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(key_path, mode=0o600) as tmp:  # the private key stays the user's alone
            tmp.write_bytes(private_key)
        with atomic_path(cert_path) as tmp:
            tmp.write_bytes(chain)
        log.info("made a local self-signed C2PA signing key in %s", folder)
    return Credentials(cert_path.read_bytes(), key_path.read_bytes(), "es256", local=True)


def _make_local_chain() -> tuple[bytes, bytes]:
    """A P-256 CA (self-signed) and a signing certificate it issued: (PEM chain signer-first, PEM key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = _dt.datetime.now(_dt.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, LOCAL_ORGANISATION)])

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not sign,
                             crl_sign=not sign, encipher_only=False, decipher_only=False)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    valid = {"not_valid_before": now - _dt.timedelta(days=1), "not_valid_after": now + _dt.timedelta(days=3650)}
    ca = (x509.CertificateBuilder(subject_name=name("appleswap local CA"), issuer_name=name("appleswap local CA"),
                                  public_key=ca_key.public_key(), serial_number=x509.random_serial_number(), **valid)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(sign=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder(subject_name=name("appleswap local signer"), issuer_name=ca.subject,
                                    public_key=key.public_key(), serial_number=x509.random_serial_number(), **valid)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(sign=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return chain, private


def _manifest(record: dict[str, Any], title: str, has_parent: bool) -> dict[str, Any]:
    agent = {"name": "appleswap", "version": __version__}
    edit = {"digitalSourceType": COMPOSITE_AI, "softwareAgent": agent,
            "description": record.get("label", "AI-generated"), "parameters": {"model": record.get("model")}}
    if has_parent:
        actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": ["parent"]}},
                   {"action": "c2pa.edited", **edit}]
    else:
        actions = [{"action": "c2pa.created", **edit}]
    return {"claim_generator_info": [agent], "title": title,
            "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": actions}},
                           {"label": RECORD_ASSERTION, "data": record}]}


def sign_c2pa(source: BinaryIO | str | Path, dest: str | Path, record: dict[str, Any], *, mime: str,
              parent: str | Path | None = None, signer: Credentials | None = None, title: str | None = None) -> None:
    """Copy ``source`` (a stream or file of type ``mime``) to ``dest`` with a signed manifest embedded."""
    import c2pa

    creds = signer or default_credentials()
    parent_path = Path(parent) if parent is not None else None
    parent_mime = C2PA_MIME.get(parent_path.suffix.lower()) if parent_path is not None else None
    if parent_path is not None and (parent_mime is None or not parent_path.is_file()):
        log.debug("%s: not a C2PA ingredient format; the manifest says c2pa.created", parent_path)
        parent_path = None
    manifest = _manifest(record, title or Path(dest).name, parent_path is not None)
    info = c2pa.C2paSignerInfo(alg=creds.algorithm.encode(), sign_cert=creds.cert_chain,
                               private_key=creds.private_key, ta_url=None)
    try:
        with contextlib.ExitStack() as stack:
            stream = stack.enter_context(open(source, "rb")) if isinstance(source, (str, Path)) else source
            c2pa_signer = stack.enter_context(c2pa.Signer.from_info(info))
            builder = stack.enter_context(c2pa.Builder(manifest))
            if parent_path is not None:
                parent_stream = stack.enter_context(open(parent_path, "rb"))
                builder.add_ingredient({"title": parent_path.name, "relationship": "parentOf", "label": "parent"},
                                       parent_mime, parent_stream)
            builder.sign(c2pa_signer, mime, stream, stack.enter_context(open(dest, "w+b")))
    except c2pa.C2paError as error:
        raise ValueError(f"C2PA signing failed for {dest}: {error}") from error


def sign_file_in_place(path: str | Path, record: dict[str, Any], *, parent: str | Path | None = None,
                       signer: Credentials | None = None) -> Path:
    """Embed signed credentials into an existing output (a video), atomically."""
    path = Path(path)
    mime = C2PA_MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path}: C2PA credentials are written into {sorted(C2PA_MIME)} files only")
    with atomic_path(path) as tmp:
        sign_c2pa(path, tmp, record, mime=mime, parent=parent, signer=signer, title=path.name)
    return path


@dataclasses.dataclass
class C2paReport:
    """What ``verify`` says about a file's content credentials."""

    present: bool
    valid: bool = False  # signature valid and every hash (manifest, picture bytes) matches
    state: str = ""  # c2pa's validation state: Valid, Invalid or Trusted
    signer: str = ""
    issuer: str = ""
    local_self_signed: bool = False
    ai_generated: bool = False
    actions: list[str] = dataclasses.field(default_factory=list)
    record: dict[str, Any] | None = None
    failures: list[str] = dataclasses.field(default_factory=list)
    error: str = ""


def read_c2pa(path: str | Path) -> C2paReport:
    """Read and validate the active manifest of ``path`` (no manifest: ``present=False``)."""
    import c2pa

    path = Path(path)
    mime = C2PA_MIME.get(path.suffix.lower())
    if mime is None:
        return C2paReport(False, error=f"{path.suffix} files cannot carry C2PA credentials here")
    try:
        with open(path, "rb") as stream, c2pa.Reader(mime, stream) as reader:
            manifest = reader.get_active_manifest() or {}
            state = reader.get_validation_state() or ""
            results = reader.get_validation_results() or {}
    except c2pa.C2paError as error:
        text = str(error)
        if "ManifestNotFound" in type(error).__name__ or "no JUMBF" in text or "not found" in text.lower():
            return C2paReport(False)
        return C2paReport(True, state="Invalid", error=text.splitlines()[0] if text else type(error).__name__)
    failures = [item.get("code", "?") for item in (results.get("activeManifest") or {}).get("failure", [])]
    for ingredient in (results.get("ingredientDeltas") or []):
        failures += [item.get("code", "?") for item in ingredient.get("validationDeltas", {}).get("failure", [])]
    hard = [code for code in failures if code not in UNTRUSTED_CODES]
    signature = manifest.get("signature_info") or {}
    actions, ai, record = [], False, None
    for assertion in manifest.get("assertions", []):
        if assertion.get("label", "").startswith("c2pa.actions"):
            for action in assertion.get("data", {}).get("actions", []):
                actions.append(action.get("action", "?"))
                ai = ai or "trainedalgorithmicmedia" in action.get("digitalSourceType", "").lower()
        elif assertion.get("label") == RECORD_ASSERTION:
            record = assertion.get("data")
    return C2paReport(
        present=True, valid=state in ("Valid", "Trusted") and not hard, state=state,
        signer=signature.get("common_name", ""), issuer=signature.get("issuer", ""),
        local_self_signed=signature.get("issuer", "") == LOCAL_ORGANISATION, ai_generated=ai, actions=actions,
        record=record, failures=hard)


def describe_c2pa(report: C2paReport) -> str:
    """One phrase for ``verify``'s text output."""
    if not report.present:
        return "no C2PA credentials"
    if not report.valid:
        why = ", ".join(report.failures) or report.error or report.state
        return f"C2PA credentials INVALID ({why}): the file or its manifest changed after signing"
    who = f"signed by {report.signer or '?'} ({report.issuer or '?'})"
    trust = ("self-signed local key: not trusted, but intact" if report.local_self_signed
             else "trusted" if report.state == "Trusted" else "signer not on a trust list, manifest intact")
    label = "AI-generated" if report.ai_generated else "not declared AI-generated"
    return f"C2PA valid, {label} [{' > '.join(report.actions)}], {who}; {trust}"


def c2pa_json(report: C2paReport) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(report), default=str))

