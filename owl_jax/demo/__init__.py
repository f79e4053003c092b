"""The `make demo` end-to-end run: synthetic shapes -> three training stages -> answers."""
