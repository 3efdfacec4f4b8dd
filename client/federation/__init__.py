"""Taking part in a federated round: the ClientApp handlers (client_app.py) relay to this party's worker
(worker.py, answering each stage), which runs beside a supervised SuperNode (supernode.py)."""
