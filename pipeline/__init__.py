"""postalign: post-hoc multimodal alignment pipeline."""
