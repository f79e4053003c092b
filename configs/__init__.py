"""Training recipes: each module has `get_config(arg=None) -> ml_collections.ConfigDict`.

Use them with `owl-train --config configs/NAME.py[:ARGS] [--config.KEY=VALUE ...]`; see
`configs/common.py` for the shared defaults and `docs/training.md` for every field.
"""
