"""Compiled engines for ``flux_dit``: the table of kinds, their builds (ONNX export, TensorRT,
AOTInductor) and the runners ``dit_engine`` loads them with."""
