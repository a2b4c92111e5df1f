"""Foundations every layer uses: one-line errors, version switches, atomic files, folder locks, settings files, numeric precision."""
