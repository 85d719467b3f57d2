"""comfyui backend plugin."""
