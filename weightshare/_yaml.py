"""Reading a user's YAML file (merge configs, compress recipes): bounded in size, one error if unreadable."""

from __future__ import annotations

import os
from pathlib import Path

from weightshare.errors import clip

MAX_YAML_BYTES = 1 << 20  # a config is a few lines; anything this large is not one


def _loader():
    """PyYAML's safe loader, reading ``1e-8`` as a number: YAML 1.1, which PyYAML follows, wants a dot
    (``1.0e-8``) and reads ``1e-8`` as a string, while mergekit (pydantic) takes it as the number its users
    mean; YAML 1.2 agrees with them."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def read_yaml(path: str | os.PathLike, what: str, error: type[Exception] = ValueError):
    """The parsed contents of ``path`` (safe_load: no Python objects); ``error`` names ``what`` it should be."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise error(f"{path}: larger than {MAX_YAML_BYTES} bytes: not a {what}")
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_loader())  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise error(clip(f"{path}: not a readable YAML file ({type(exc).__name__}: {exc})")) from None
