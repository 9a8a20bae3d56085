"""Self-supervised pre-training methods, each a :class:`~medssl_kit.methods.base.PretrainMethod`."""
