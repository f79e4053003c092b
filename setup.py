"""owl-jax: mPLUG-Owl in JAX/Flax."""
from setuptools import find_packages, setup

# Direct dependencies, pinned to the versions the test suite runs against.
# `requirements.lock` pins the whole transitive closure for CI.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.4",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "ml_collections==1.1.0",
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",     # tokenizer.json (Qwen2's BPE: mPLUG-Owl3)
    "pillow==13.0.0",
    "numpy==2.4.6",
    "array_record==0.8.6",
    "pyarrow==26.0.1",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
]
TORCH = ["torch==2.13.0", "safetensors==0.8.0", "transformers==5.23.0"]
# owl-serve (owl_jax.serve); its tests drive it with the official openai client and a headless
# browser (selenium over Debian's chromium + chromium-driver).
SERVE = ["starlette==1.10.0", "uvicorn==0.55.0"]
VIDEO = ["av==18.1.0"]     # video files -> frames (FFmpeg wheels on PyPI, see owl3/video.py)
TEST = SERVE + VIDEO + ["openai==3.63.0", "httpx2==2.16.2", "selenium==4.51.0",
                        "pytest==9.2.0", "pytest-xdist==3.8.0", "nbclient==0.11.0",
                        "nbformat==5.11.1", "ipykernel==7.4.0"]

setup(
    name="owl-jax",
    version="0.1.0",
    description="mPLUG-Owl (arXiv 2304.14178) in JAX/Flax: model, converters, data, training, inference",
    # convert/ and configs/ stay top-level folders in the repository but install as
    # owl_jax.convert and owl_jax.configs (top-level names like `configs` collide across projects).
    packages=find_packages(include=["owl_jax", "owl_jax.*"])
    + ["owl_jax.convert", "owl_jax.configs"]
    + ["owl_jax.configs." + p for p in find_packages("configs")],  # one folder per family
    package_dir={"owl_jax.convert": "convert", "owl_jax.configs": "configs"},
    # compiled on first use (owl_jax.native)
    package_data={"owl_jax": ["csrc/*.cc"], "owl_jax.generate.cpu": ["*.cc"],
                  "owl_jax.serve": ["static/*"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "torch": TORCH,
        "serve": SERVE,
        "video": VIDEO,
        "test": TORCH + TEST,
        "tpu": ["jax[tpu]==0.10.2"],
        "cuda": ["jax[cuda12]==0.10.2"],
    },
    entry_points={
        "console_scripts": [
            "owl-convert=owl_jax.convert.cli:main",
            "owl-generate=owl_jax.cli.generate:main",
            "owl-data=owl_jax.cli.data:main",
            "owl-train=owl_jax.cli.train:main",
            "owl-eval=owl_jax.cli.eval:main",
            "owl-serve=owl_jax.cli.serve:main",
        ]
    },
)
