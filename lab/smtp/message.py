"""The message a ``mail`` step sends: headers, body, marker, padding to a size, dot-stuffed, final dot."""

from __future__ import annotations

from lab.smtp.steps import Mail

#: One line of padding (76 characters and CRLF) used to reach a ``size``.
_FILLER = "x" * 76 + "\r\n"


def message_bytes(step: Mail) -> bytes:
    """The DATA content of a ``mail`` step, ready to write after the 354 (RFC 5321 4.5.2 dot-stuffing)."""
    to = step.rcpt_to[0] if step.rcpt_to else ""
    lines = [f"From: <{step.mail_from}>", f"To: <{to}>", "Subject: smtplab test message", ""]
    if step.body is not None:
        lines += step.body.replace("\r\n", "\n").split("\n")
    if step.marker:
        lines.append(step.marker)
    text = "".join(f"{line}\r\n" for line in lines)
    if step.size is not None:
        missing = step.size - len(text.encode("utf-8"))
        if missing > 0:
            count, rest = divmod(missing, len(_FILLER))
            text += _FILLER * count + ("x" * max(rest - 2, 0) + "\r\n" if rest else "")
    stuffed = "".join("." + line if line.startswith(".") else line for line in text.splitlines(keepends=True))
    return stuffed.encode("utf-8") + b".\r\n"
