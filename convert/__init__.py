"""owl-convert: mPLUG-Owl weights between the official PyTorch layout, HF LLaMA / CLIP and owl_jax.

Modules: `keymap` (the key / layout table), `torch_io` (streaming .bin / safetensors, sharded),
`official` (torch <-> jax), `hf_llama`, `hf_clip`, `from_hf` (fresh Owl from HF parts),
`lora` (PEFT keys and merging), `cli` (the `owl-convert` command).
"""
