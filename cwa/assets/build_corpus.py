"""Freeze CPython's ``pydoc_data.topics`` into ``cwa/assets/corpus/pydoc_topics.json.gz``.

Run by hand (never in CI): ``python -m cwa.assets.build_corpus``.

Why a frozen copy: ``pydoc_data.topics`` changes with every Python release, so reading it
at run time would make results depend on the interpreter. The snapshot is written as a
JSON object (topic -> text, sorted keys) and gzipped with ``mtime=0`` and no file name in
the header, so the same input always gives the same bytes. After running this, paste the
printed SHA-256 into ``CORPUS_SHA256`` in ``cwa/assets/__init__.py``.

The snapshot committed in the repository was taken from CPython 3.11.7 (79 topics).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform


def snapshot_bytes(topics: dict[str, str]) -> bytes:
    """Return the reproducible gzip bytes of ``topics`` (sorted keys, mtime 0)."""
    payload = json.dumps(topics, sort_keys=True, ensure_ascii=False, indent=1) + "\n"
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(payload.encode("utf-8"))
    return buf.getvalue()


def main() -> None:
    from pydoc_data.topics import topics

    from cwa.assets import CORPUS_PATH

    data = snapshot_bytes(dict(topics))
    CORPUS_PATH.parent.mkdir(parents=True, exist_ok=True)
    CORPUS_PATH.write_bytes(data)
    print(
        f"Python {platform.python_version()}: {len(topics)} topics, "
        f"{sum(len(v) for v in topics.values())} characters -> {CORPUS_PATH}"
    )
    print(f"CORPUS_SHA256 = {hashlib.sha256(data).hexdigest()!r}")


if __name__ == "__main__":
    main()
