"""Helpers that build tiny real artefacts (tokenizers, data) for tests and demos."""
