"""Reading images and writing label volumes: the only place that touches files and stores."""
