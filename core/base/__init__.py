"""What every room of core uses: errors, atomic I/O and digests, bounds of untrusted input, archive integrity, dtype names, torchrun ranks, torch.compile."""
