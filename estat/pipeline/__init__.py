"""The pipeline behind the handlers: event queue, batcher, uploader."""
