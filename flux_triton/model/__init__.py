"""The transformer: presets, safe loading, and the GPU speed-ups applied to a loaded model."""
