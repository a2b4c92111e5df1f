"""`python -m copra.federated.app`: print the app folder, for `flwr run $(python -m copra.federated.app) ...`."""

from copra.federated.app import APP_DIR

print(APP_DIR)
