"""Built-in ctmkit plugins, registered through the same hooks as third-party ones."""
