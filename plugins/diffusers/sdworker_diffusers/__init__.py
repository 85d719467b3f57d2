"""diffusers backend plugin."""
