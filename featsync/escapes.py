"""Text from outside (a file name, an image ID, a server's reason) made safe to print
on a terminal: a control character in a name must neither colour the screen, move the
cursor, nor forge a line of its own."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with each non-printable character (a control character, a line break, an
    escape) written as a Python escape: `\\x1b`, `\\n`, `\\u2028`."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
