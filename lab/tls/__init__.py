"""TLS for the lab: the lab CA and certificates, the TLS connection creators, the NSS key log."""
