"""``smtplab cli``: an appliance-style command line over the appliance YAML file (docs/cli.md).

``document`` holds the file and the pending edits, ``terminal`` the I/O (readline, or answers from a script),
``prompts`` the numbered menus and checked answers, and the dialog modules one appliance command each.
"""
