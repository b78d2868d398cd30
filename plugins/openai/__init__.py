"""openai/consistency_models' UNet (unet.py), re-implemented with its parameter names: the network of the openai teachers."""
