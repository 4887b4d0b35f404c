"""C2PA content credentials: sign + validate round trips (local self-signed key, user key), tamper detection,
the AI-generated declaration, MP4, and `appleswap verify` on changed files."""

from __future__ import annotations

import datetime as dt
import json
import os

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from appleswap.app.video import write_video
from appleswap.cli import main
from appleswap.files import load_image
from appleswap.provenance.credentials import (
    COMPOSITE_AI,
    configure_credentials,
    credentials_dir,
    load_credentials,
    local_credentials,
    read_c2pa,
    sign_file_in_place,
)
from appleswap.provenance.labels import provenance_record, read_image_provenance, write_labelled_output


@pytest.fixture(scope="module")
def picture(faces_dir):
    return load_image(faces_dir / "obama2.jpg")[:256, :256]


def _user_key(folder):
    """An ES384 signing certificate issued by a throw-away "Newsroom" CA (as an organisation would provide)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Newsroom Root"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Newsroom")])
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Newsroom desk"),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Newsroom")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    leaf = (x509.CertificateBuilder().subject_name(leaf_name).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(2).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    (folder / "user.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (folder / "user.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                                      + ca.public_bytes(serialization.Encoding.PEM))
    return folder / "user.key", folder / "user.pem"


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_self_signed_round_trip(tmp_path, picture, faces_dir, ext):
    configure_credentials()  # no flags, no environment: the local key
    target = faces_dir / "obama2.jpg"
    path = write_labelled_output(tmp_path / f"out.{ext}", picture, model="appleswap-student", parent=target)
    report = read_c2pa(path)
    assert report.present and report.valid and report.state == "Valid" and not report.failures
    assert report.local_self_signed and report.signer == "appleswap local signer"
    assert report.ai_generated and report.actions == ["c2pa.opened", "c2pa.edited"]  # an edit of the target photo
    assert report.record["model"] == "appleswap-student" and report.record["watermark"]
    assert read_image_provenance(path)["model"] == "appleswap-student"  # the metadata label is kept beside it
    # the local key is cached in the cache folder, made once
    assert credentials_dir().parent == __import__("pathlib").Path(os.environ["APPLESWAP_CACHE"])
    assert local_credentials().cert_chain == (credentials_dir() / "signer.chain.pem").read_bytes()


def test_created_without_parent_declares_composite_ai(tmp_path, picture):
    configure_credentials()
    path = write_labelled_output(tmp_path / "out.png", picture, model="m", watermark_key=None)
    report = read_c2pa(path)
    assert report.valid and report.actions == ["c2pa.created"]
    import c2pa

    with open(path, "rb") as stream, c2pa.Reader("image/png", stream) as reader:
        actions = reader.get_active_manifest()["assertions"][0]["data"]["actions"]
    assert actions[0]["digitalSourceType"] == COMPOSITE_AI and actions[0]["softwareAgent"]["name"] == "appleswap"


def test_user_key_round_trip_and_tamper(tmp_path, picture, capsys):
    key, cert = _user_key(tmp_path)
    creds = load_credentials(key, cert)
    assert creds.algorithm == "es384" and not creds.local
    path = write_labelled_output(tmp_path / "out.jpg", picture, model="m", signer=creds)
    report = read_c2pa(path)
    assert report.valid and report.signer == "Newsroom desk" and report.issuer == "Newsroom"
    assert not report.local_self_signed
    # change one pixel's bytes in the compressed data: the picture no longer matches the signed hash
    data = bytearray(path.read_bytes())
    data[-200] ^= 0x20
    tampered = tmp_path / "tampered.jpg"
    tampered.write_bytes(bytes(data))
    bad = read_c2pa(tampered)
    assert bad.present and not bad.valid and any("mismatch" in code for code in bad.failures)
    assert main(["verify", str(tampered)]) == 1
    assert "C2PA credentials INVALID" in capsys.readouterr().out
    assert main(["verify", str(path), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["c2pa_valid"] and not line["tampered"] and line["c2pa"]["signer"] == "Newsroom desk"


def test_bad_key_files_are_one_line_errors(tmp_path):
    (tmp_path / "k.pem").write_text("not a key")
    (tmp_path / "c.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="--c2pa-key .*not an unencrypted PEM private key"):
        load_credentials(tmp_path / "k.pem", tmp_path / "c.pem")
    with pytest.raises(ValueError, match="no such file"):
        load_credentials(tmp_path / "missing.pem", tmp_path / "c.pem")
    with pytest.raises(ValueError, match="both --c2pa-key and --c2pa-cert"):
        configure_credentials(tmp_path / "k.pem", None)


def test_mp4_is_signed_in_place(tmp_path):
    configure_credentials()
    frames = [np.full((64, 64, 3), 90 + i, np.uint8) for i in range(3)]
    path = write_video(tmp_path / "v.mp4", frames, 10)
    assert not read_c2pa(path).present
    sign_file_in_place(path, provenance_record("appleswap-student", watermarked=False))
    report = read_c2pa(path)
    assert report.valid and report.ai_generated and report.record["model"] == "appleswap-student"


def test_resave_drops_credentials_not_validity(tmp_path, picture):
    configure_credentials()
    path = write_labelled_output(tmp_path / "out.jpg", picture, model="m", watermark_key=None)
    Image.open(path).save(tmp_path / "resaved.jpg", quality=90)  # another program re-saves: no manifest left
    assert not read_c2pa(tmp_path / "resaved.jpg").present


def test_local_signing_key_is_private_whatever_the_umask(tmp_path):
    """The made key is 0600 (only its owner reads it); the certificate chain follows the umask like any output."""
    previous = os.umask(0o022)
    try:
        local_credentials(tmp_path / "keys")
    finally:
        os.umask(previous)
    assert (tmp_path / "keys" / "signer.key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / "signer.chain.pem").stat().st_mode & 0o777 == 0o644
