"""The deployable jumper: TorchScript and AOTInductor export and load, K-step sampling, sample files."""
