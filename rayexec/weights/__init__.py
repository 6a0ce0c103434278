"""Train -> serve weight sync: the resharding plan (plan.py), the worker-side
contract and transfer (contract.py, transport.py), and the driver-side sync
(sync.py) that RayDistributedExecutor.update_weights runs."""
