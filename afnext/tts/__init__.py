"""Speech out: synthesizers that turn answer text (never reasoning) into audio."""
