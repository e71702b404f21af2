"""diffusers integration: the fused attention processor and helpers to install it on any model."""
