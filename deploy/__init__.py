"""Real deployments: certificates (make_certs), the SuperLink / SuperNode launcher (launch), the Flower
CLI wrapper (flwr_cli) and the processes it starts and stops (processes)."""
