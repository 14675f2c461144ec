"""llama: placeholder package; its issue fills it in."""
