"""torch code without Beam: open_clip loading, the taming-compatible VQGAN, the VQGAN+CLIP loop."""
