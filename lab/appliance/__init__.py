"""The appliance: configuration model and loader, certificates, spool and mail log."""
