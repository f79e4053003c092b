"""`python -m owl_jax.demo` (what `make demo` runs)."""
import sys

from owl_jax.demo.run import main

if __name__ == "__main__":
    sys.exit(main())
