"""nf4: placeholder package; its issue fills it in."""
