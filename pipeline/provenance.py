"""Run-level provenance: run id, code version, library versions."""

from __future__ import annotations

import platform
import re
import subprocess
import uuid
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pipeline

LIBRARIES = ("torch", "diffusers", "transformers", "controlnet-aux", "ray", "pyarrow", "numpy", "pillow", "opencv-python-headless")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def code_version() -> str:
    """Package version, plus the git commit (and '-dirty') when running from a checkout."""
    root = Path(pipeline.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return pipeline.__version__
    return f"{pipeline.__version__}+g{commit}{'-dirty' if dirty else ''}"


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


# Fields that hold credentials in fsspec filesystems' options (s3fs, gcsfs, adlfs, HTTP headers), by exact
# name (case-insensitive): `caption_key` or `key_prefix` are not secrets, `key` and `secret` are.
SECRET_FIELDS = frozenset({
    "key", "secret", "token", "password", "passwd", "session_token", "security_token", "access_key", "secret_key",
    "access_key_id", "secret_access_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "account_key", "sas", "sas_token", "credential", "credentials", "connection_string", "client_secret",
    "api_key", "apikey", "auth", "authorization", "proxy-authorization", "cookie", "private_key",
})
URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]*)@")


def redacted(value: Any, options: bool = False) -> Any:
    """A config as data with credentials replaced: known secret fields inside `storage_options` (where
    fsspec filesystems take credentials; `generation.prompt.key` elsewhere is not one), and passwords
    in URLs anywhere."""
    if isinstance(value, dict):
        return {k: "<redacted>" if options and str(k).lower() in SECRET_FIELDS and v
                else redacted(v, options or str(k).endswith("storage_options")) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, options) for v in value]
    if isinstance(value, str):
        return URL_CREDENTIALS.sub(r"\g<scheme>\g<user>:<redacted>@", value)
    return value
