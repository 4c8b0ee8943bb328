"""Networks (built-in U-Net and dilated context network) and model loading."""
