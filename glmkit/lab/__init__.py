"""Measurement, the official reference and the demo model's training; the library never imports these."""
