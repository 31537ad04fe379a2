"""Framework adapters for ``miu_hooks``: Hugging Face Trainer and Accelerate."""
