"""Loss functions, one small module per family, each with its paper equation in the docstring."""
