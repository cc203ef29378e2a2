"""The control plane: the controller decides, node agents supervise, warm spares wait.

Nothing here imports a training framework; the only torch used is its TCPStore.
"""
