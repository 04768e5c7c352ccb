"""Model building blocks: components per preset, LoRA, the one-step generator, VSD math."""
