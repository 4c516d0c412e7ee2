"""One switch for progress bars: the CLI's --quiet turns them off."""

from tqdm.auto import tqdm

_enabled = True


def set_progress(enabled: bool) -> None:
    """Show (True) or hide (False) weightshare's progress bars."""
    global _enabled
    _enabled = bool(enabled)


def progress(iterable=None, **kwargs):
    """``tqdm`` that honours ``set_progress``; bars stay off the way of pipes by writing to stderr."""
    return tqdm(iterable, disable=not _enabled, **kwargs)
