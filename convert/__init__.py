"""owl-convert: model weights between the official / HF PyTorch layouts and owl_jax.

Modules: `keymap` (key-table machinery, the LLaMA table), `torch_io` (streaming .bin /
safetensors, sharded), `official` (Owl torch <-> jax; its key table in
owl_jax.families.owl1.keymap), `llava` (LLaVA's llava-hf and original layouts; key tables in
owl_jax.families.llava.keymap), `hf_llama`, `hf_clip`, `from_hf` (fresh models from HF parts),
`lora` (PEFT keys and merging), `cli` (the `owl-convert` command).
"""
