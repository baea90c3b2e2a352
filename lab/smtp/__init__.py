"""SMTP: the sans-IO server session, the Twisted listener, the scripted client engine."""
