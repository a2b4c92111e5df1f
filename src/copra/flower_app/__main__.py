"""`python -m copra.flower_app`: print the app folder, for `flwr run $(python -m copra.flower_app) ...`."""

from copra.flower_app import APP_DIR

print(APP_DIR)
