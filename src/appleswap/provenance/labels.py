"""Machine-readable "AI-generated" labels on every output: signed C2PA content credentials, plus PNG text chunks,
EXIF + XMP for JPEG/WebP and MP4 tags.

Why several carriers: PNG viewers read tEXt, photo tools read EXIF UserComment, content-credential aware tools
read XMP's IPTC ``DigitalSourceType``; video players show the MP4 ``comment``. All carry the same JSON record.
Only the C2PA manifest is signed, so only it proves who made the file and that nothing changed since
(:mod:`appleswap.provenance.credentials`); every metadata carrier is lost when a picture is re-saved by another program,
which is what the pixel watermark (:mod:`appleswap.provenance.watermark`) is for.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin

from appleswap import __version__
from appleswap.files import atomic_path
from appleswap.provenance import watermark
from appleswap.provenance.credentials import C2PA_MIME, Credentials, sign_c2pa

PROVENANCE_KEY = "appleswap:provenance"
VIDEO_TAG = "appleswap_provenance"
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
LABEL = "AI-generated: face swapped with appleswap"
WATERMARK_SCHEME = "appleswap-tiled-v2"
_USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def provenance_record(model: str, *, watermarked: bool, **extra: Any) -> dict[str, Any]:
    """The JSON record written into every output (tool, version, model, time, watermark scheme)."""
    record = {
        "ai_generated": True,
        "label": LABEL,
        "tool": "appleswap",
        "version": __version__,
        "model": model,
        "digital_source_type": DIGITAL_SOURCE_TYPE,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "watermark": WATERMARK_SCHEME if watermarked else None,
    }
    record.update({k: v for k, v in extra.items() if v is not None})
    return record


def xmp_packet(record: dict[str, Any]) -> bytes:
    """A minimal XMP packet with IPTC DigitalSourceType, CreatorTool and the full record."""
    payload = html.escape(json.dumps(record, sort_keys=True), quote=True)
    text = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:appleswap="https://appleswap.invalid/ns/1.0/" '
        f'Iptc4xmpExt:DigitalSourceType="{DIGITAL_SOURCE_TYPE}" xmp:CreatorTool="appleswap {__version__}" '
        f'appleswap:Provenance="{payload}"><dc:description><rdf:Alt><rdf:li xml:lang="x-default">{LABEL}'
        "</rdf:li></rdf:Alt></dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    )
    return text.encode("utf-8")


def _exif(record: dict[str, Any]) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Software] = f"appleswap {__version__}"
    exif[ExifTags.Base.ImageDescription] = LABEL
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _USER_COMMENT_ASCII + json.dumps(
        record, sort_keys=True).encode("ascii")
    return exif


def save_labelled_image(path: str | Path, image: np.ndarray, record: dict[str, Any], quality: int = 95, *,
                        parent: str | Path | None = None, signer: Credentials | None = None) -> Path:
    """Write ``image`` atomically with the provenance record in every carrier its format supports, and a C2PA
    manifest signed with ``signer`` (default: :func:`default_credentials`); ``parent``: the photo that was edited."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"output {path}: unsupported image extension {path.suffix!r}; use one of {sorted(_FORMATS)}")
    pil = Image.fromarray(np.ascontiguousarray(image))
    kwargs: dict[str, Any] = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(PROVENANCE_KEY, json.dumps(record, sort_keys=True))
        info.add_text("Software", f"appleswap {__version__}")
        info.add_text("Description", LABEL)
        info.add_itxt("XML:com.adobe.xmp", xmp_packet(record).decode("utf-8"))
        kwargs["pnginfo"] = info
    else:
        kwargs.update(exif=_exif(record).tobytes(), xmp=xmp_packet(record), quality=quality)
    encoded = io.BytesIO()
    pil.save(encoded, format=fmt, **kwargs)
    encoded.seek(0)
    with atomic_path(path) as tmp:
        sign_c2pa(encoded, tmp, record, mime=C2PA_MIME[path.suffix.lower()], parent=parent, signer=signer)
    return path


def write_labelled_output(path: str | Path, image: np.ndarray, *, model: str, parent: str | Path | None = None,
                          watermark_key: int | None = watermark.DEFAULT_KEY, signer: Credentials | None = None,
                          quality: int = 95, **extra: Any) -> Path:
    """The one call every writer of a generated picture makes: watermark it (``watermark_key=None``: no mark),
    record tool / version / model (+ ``extra``), and write it with the label and signed C2PA credentials."""
    if watermark_key is not None:
        image = watermark.embed_watermark(image, watermark_key)
    record = provenance_record(model, watermarked=watermark_key is not None, **extra)
    return save_labelled_image(path, image, record, quality, parent=parent, signer=signer)


def _from_xmp(xmp: Any) -> dict[str, Any] | None:
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    if not isinstance(xmp, str):
        return None
    match = re.search(r'appleswap:Provenance="([^"]*)"', xmp)
    return json.loads(html.unescape(match.group(1))) if match else None


def _from_exif(image: Image.Image) -> dict[str, Any] | None:
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(comment, bytes) and comment.startswith(_USER_COMMENT_ASCII):
        comment = comment[len(_USER_COMMENT_ASCII):].decode("ascii", "replace")
    if isinstance(comment, str) and comment.lstrip().startswith("{"):
        try:
            return json.loads(comment)
        except json.JSONDecodeError:
            return None
    return None


def read_image_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance record of an image, from PNG text, EXIF or XMP (first found); None when unlabelled."""
    with Image.open(path) as image:
        text = getattr(image, "text", None) or {}
        if PROVENANCE_KEY in text:
            return json.loads(text[PROVENANCE_KEY])
        record = _from_exif(image)
        if record is None:
            record = _from_xmp(image.info.get("xmp") or image.info.get("XML:com.adobe.xmp"))
    return record


def video_tags(record: dict[str, Any]) -> dict[str, str]:
    """MP4 container tags (written with ``movflags=use_metadata_tags`` so the custom key survives)."""
    return {
        "comment": f"{LABEL} ({record.get('model')})",
        "description": LABEL,
        "encoder": f"appleswap {__version__}",
        VIDEO_TAG: json.dumps(record, sort_keys=True),
    }


def read_video_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance record stored in a video's container tags; None when absent."""
    import av

    with av.open(str(path)) as container:
        tags = dict(container.metadata)
    if VIDEO_TAG in tags:
        return json.loads(tags[VIDEO_TAG])
    if LABEL in tags.get("comment", ""):
        return {"ai_generated": True, "label": tags["comment"]}
    return None
