"""The client: a remote transformer for ``FluxPipeline``, its transports and a denoising CLI.
It uses only the contract and the pipeline layers, so it installs without the serving stack."""
