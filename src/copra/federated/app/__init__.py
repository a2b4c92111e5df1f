"""copra's Flower app for the deployment engine: federated LoRA / CopRA across real machines.

Paper: Zhuang et al., "CopRA" (2024), Sec. 3.1, Table 1 (left): clients train adapters on parts
of the data, the server merges them with fusion. `copra.federated.simulation` runs that protocol in Flower's
simulation (one process tree); this folder is the same protocol as a Flower app for a SuperLink
and SuperNodes on separate machines. Its `pyproject.toml` names the components and the run config:

  * `client_app:app`: trains the SuperNode's partition (`--node-config "partition-id=I num-partitions=K"`);
  * `server_app:app`: FusionFedAvg with deadlines (`strategy.DeploymentFusion`); writes history.json
    and the merged PEFT adapter to `output-dir` after every round;
  * `settings.DeploySettings`: the run config (what to train, the failure policy);
  * `launch`: commands, environment, TLS certificates and SuperNode keys (used by the tests and
    for trying the engine on one machine).

Run it with `flwr run $(python -m copra.federated.app) <connection>` (docs/federated.md: "On real
machines").
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent  #: the Flower app folder (`flwr run APP_DIR ...`)
