"""Scenarios as data: model, schema, loader, evaluator, runner, result record."""
