"""The appliance as a sender: destination controls, the delivery queue, MTA-STS and TLS-RPT (docs/outbound.md)."""
