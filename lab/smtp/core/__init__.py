"""The sans-IO SMTP core both sides share (after h11): bytes in, typed events out; values in, bytes out.

- ``readers``: the line reader (limits, CRLF rules, the end-of-data rule), command lines, message text, replies.
- ``commands``: command verbs, arguments and paths.
- ``events``: what crosses the wire as typed values (``Command``, ``Reply``, ``ReceivedReply``, ``EndOfData``)
  and what the server session reports for the mail log.
- ``errors``: protocol errors as typed exceptions that carry the offending input.
- ``state``: the server session's states and its transition table, as data.

Nothing here does I/O, reads a clock or imports Twisted; SMTP syntax is parsed nowhere else in ``lab``.
"""
