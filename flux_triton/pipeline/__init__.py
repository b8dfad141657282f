"""The parity reference: ``FluxPipeline``'s exact transformer call, pipeline-shaped inputs, its denoising loop."""
