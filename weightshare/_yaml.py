"""Reading a user's YAML file (merge configs, compress recipes): bounded in size, one error if unreadable."""

from __future__ import annotations

import os
from pathlib import Path

from weightshare.errors import clip

MAX_YAML_BYTES = 1 << 20  # a config is a few lines; anything this large is not one


def read_yaml(path: str | os.PathLike, what: str, error: type[Exception] = ValueError):
    """The parsed contents of ``path`` (safe_load: no Python objects); ``error`` names ``what`` it should be."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise error(f"{path}: larger than {MAX_YAML_BYTES} bytes: not a {what}")
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise error(clip(f"{path}: not a readable YAML file ({type(exc).__name__}: {exc})")) from None
