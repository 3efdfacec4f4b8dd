"""The wire contract: protobuf manifests (mos.proto) carried inside Flower records."""
