"""A quickstart-shaped Flower app, converted to DP-SignSGD."""
