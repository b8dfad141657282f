"""What runs inside the Triton models: dit_transformer's service, dit_preprocess, request merging,
fault handling, and the Python-backend glue. The model files in ``model_repository/`` are thin
adapters over this package."""
