"""Building blocks shared by methods (heads, and later LoRA, adapters, prompts, classifier alignment...)."""
