"""Federated learning: data that stays on workers, models that travel to it.

* :class:`FederatedDataset` / :func:`federate`: data split across workers (or hosted by them);
* :class:`FederatedDataLoader`: pointer batches, worker by worker;
* :func:`train_sequential`: the paper's loop (the model visits each worker's data in turn);
* :func:`fedavg`: FedAvg rounds with a :class:`Strategy` (:class:`FedAvg`,
  :class:`SecureFedAvg`, :class:`DPFedAvg`), FedProx, dropped workers and checkpoints;
* :func:`private_fedavg`: FedAvg whose clients run DP-SGD where the data lives
  (:func:`dp_sgd_mlp`, one remote call per worker and round).
"""

from veil.fl._checkpoint import load_checkpoint, save_checkpoint
from veil.fl._data import FederatedDataLoader, FederatedDataset, WorkerData, federate
from veil.fl._dp import DPFedAvg
from veil.fl._dp_local import PrivateFedAvgResult, dp_sgd_mlp, mlp, private_fedavg
from veil.fl._local import LOSSES, local_sgd
from veil.fl._secure_agg import secure_sum
from veil.fl._strategy import ClientUpdate, FedAvg, SecureFedAvg, Strategy
from veil.fl._train import FedHistory, NotEnoughWorkers, RoundReport, fedavg, train_sequential

__all__ = [
    "LOSSES",
    "ClientUpdate",
    "DPFedAvg",
    "FedAvg",
    "FedHistory",
    "FederatedDataLoader",
    "FederatedDataset",
    "NotEnoughWorkers",
    "PrivateFedAvgResult",
    "RoundReport",
    "SecureFedAvg",
    "Strategy",
    "WorkerData",
    "dp_sgd_mlp",
    "fedavg",
    "federate",
    "load_checkpoint",
    "local_sgd",
    "mlp",
    "private_fedavg",
    "save_checkpoint",
    "secure_sum",
    "train_sequential",
]
