"""One module per ``smtplab`` subcommand; each has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``."""
