"""Tools over the package: the demo, the load test, the tiny models. Nothing imports tools."""
