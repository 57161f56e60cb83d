"""Real deployments: certificates (make_certs) and the SuperLink / SuperNode launcher (launch)."""
