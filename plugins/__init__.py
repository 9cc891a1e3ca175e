"""Built-in measure and detector plugins, one per module, registered through entry points."""
