"""Federated Meerkat: messages, client, server, strategies, transports and the in-process simulator."""
