"""What the federated service shares between server and clients: the wire (manifests and checks), the Gram codec,
Flower's processes (SuperLink, SuperNode, CLI) and TLS material."""
