"""Deployment: generating and checking model repositories, launching tritonserver, the make commands."""
