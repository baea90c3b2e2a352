"""smtplab: a network simulation and conformance test lab for SMTP STARTTLS policies."""

__version__ = "0.1.0"
