"""What a run is configured with: the config (every key declared once), the stage table (every stage declared once), the plugin registry and its hooks."""
