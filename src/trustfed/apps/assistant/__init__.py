"""A built-in app that fine-tunes a causal language model with LoRA adapters for an assistant that
answers and calls tools (JSON function calls). Only the adapters travel; the base model stays where
every participant loaded it (``save_pretrained`` layout, safetensors only)."""
