"""a1111 backend plugin."""
