"""How error messages quote text they do not control.

Packed files, configs and recipes are untrusted input: a field may hold megabytes,
and an error quoting it whole would flood the terminal and the log.  Every message
that quotes such a value, or another error's text, goes through ``clip``.
"""

__all__ = ["LIMIT", "MARK", "clip"]

# 300 characters are three to four lines of a terminal: the rule, the expected and
# the start of what was got show, and a hostile value cannot bury them
LIMIT = 300
MARK = "..."  # what ends a cut message, so that a reader knows the value went on


def clip(text: str, limit: int = LIMIT) -> str:
    """``text`` as it is if it has at most ``limit`` characters, else its start ending in ``MARK``,
    ``limit`` characters in all.

    Not ``textwrap.shorten``: it joins lines, and a message's lines (rule, expected, got) must stay.
    """
    if len(text) <= limit:
        return text
    return text[:max(limit - len(MARK), 0)] + MARK
