"""Checkpoints: every way of naming a CLIP ViT, read into (model, params, tokenizer) by `load.load_clip`.

`rules` holds the name/shape tables from PyTorch state dicts (OpenAI, OpenCLIP, Hugging Face), `convert` applies
them and checks the result against `jax.eval_shape` of the model's init, `sources` reads files and the hub, and
`folder` writes and reads the converted folder (safetensors or npz, never pickle).
"""
