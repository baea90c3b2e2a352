"""Conformance against other MTAs (issue 4): target profiles, declared deviations, baselines, policy probing."""
